//! What the first bytes of a connection say about its protocol, and what a
//! request head says about where it is going. Pure functions, no I/O: the
//! proxy reads, this crate decides (and is fuzzed).
#![forbid(unsafe_code)]

mod authority;
mod path;
mod protocol;
mod tls;

pub use authority::{Authority, AuthorityError};
pub use path::{PathError, normalize_path};
pub use protocol::{Detection, MAX_PREFIX, Protocol, detect};
pub use tls::{ClientHello, client_hello};
