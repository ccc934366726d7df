//! The controller↔node agent API: the server runs in `strata node`, the client in the controller.
//! Every call carries a shared bearer token; a call without the right token is refused. The API is
//! carried over TLS (mutual when the agent has a client CA) unless plaintext is asked for
//! explicitly.

pub mod auth;
pub mod server;
pub mod tls;
