//! `cargo fuzz run config_yaml`: the gateway's config file (`Config::parse`).
//!
//! Any text is accepted or refused with an error, never a panic; a config that is accepted
//! builds its routes and kernel state, counts its destinations consistently, is its own
//! reload without restart, and parses again to the same config.

#![no_main]

use gateway::{
    config::{Config, Origin},
    proxy::Routes,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text, Origin::Embedded) else {
        return;
    };
    let routes = Routes::new(&config);
    assert_eq!(routes.services().count(), config.services.len());
    let state = config.desired_state();
    let in_state: usize = state
        .services
        .iter()
        .map(|s| s.vips.len() + s.endpoints.len())
        .sum();
    assert_eq!(in_state, config.destination_count());
    let _ = config.summary();
    assert!(config.restart_required(&config).is_empty());
    let again = Config::parse(text, Origin::Embedded).expect("parses a second time");
    assert!(again.restart_required(&config).is_empty());
    assert_eq!(again.summary(), config.summary());
});
