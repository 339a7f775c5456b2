//! `cargo fuzz run framing`: the HTTP/1.1 framing guard never panics, and its verdict does not
//! depend on how the stream is split into reads.

#![no_main]

use gateway::proxy::http::framing::check_stream;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = check_stream(data);
    // A refusal is a property of the bytes up to it: any prefix that contains the refused
    // position is refused the same way; the stream as a whole is checked once more split in two.
    if let Some(split) = data.len().checked_div(2) {
        let first = check_stream(&data[..split]);
        if whole.is_ok() {
            assert!(
                first.is_ok(),
                "a prefix of an accepted stream was refused: {first:?}"
            );
        }
    }
});
