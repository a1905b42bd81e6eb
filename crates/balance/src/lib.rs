//! Request-level load balancing: power of two choices over peak-EWMA latency
//! weighted by in-flight requests, with static endpoint weights, and a
//! breaker per endpoint that takes one failing in a row out of balancing.
#![forbid(unsafe_code)]

mod breaker;
mod budget;
mod load;
mod set;
mod window;

pub use breaker::{BreakerConfig, Outcome};
pub use budget::RetryBudget;
pub use load::{Cost, FAILURE_PENALTY, Load, PeakEwmaConfig, Pending};
pub use set::{Set, SetError};
pub use window::LatencyWindow;
