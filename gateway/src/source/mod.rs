//! Where protected services and workload identities come from besides the static config: the
//! Kubernetes source (label-protected Services, their `EndpointSlices`, this node's Pods,
//! `AccessPolicy` resources and the gateway peers), published as a [`model::Snapshot`].

pub mod apply;
pub mod crd;
pub mod kubernetes;
pub mod model;
pub mod pods;
pub mod reconcile;

#[cfg(test)]
mod tests;
