//! Request-level load balancing: power of two choices over peak-EWMA latency
//! weighted by in-flight requests, with static endpoint weights.
#![forbid(unsafe_code)]

mod load;
mod set;

pub use load::{FAILURE_PENALTY, Load, PeakEwmaConfig, Pending};
pub use set::{Set, SetError};
