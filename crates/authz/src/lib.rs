//! Inbound server policy: which clients may reach a port and its HTTP
//! routes, and how often. `compile` turns a port's policy as an operator
//! writes it into the model the Linkerd inbound API carries; `model`
//! decides connections and requests from it; `limit` holds the rate-limit
//! buckets. Pure logic, no I/O: the proxy enforces it, weft-control serves
//! it, both from the same code.

pub mod compile;
pub mod limit;
pub mod model;

pub use compile::{AuthzSpec, CompileError, DefaultPolicy, PortSpec, RouteSpec, compile};
pub use limit::{Limiter, Override, RateLimit, Scope};
pub use model::{
    Authn, Authorization, Client, Denied, Identities, Network, PathMatch, Permit, Protocol, Route,
    RouteMatch, Server,
};
