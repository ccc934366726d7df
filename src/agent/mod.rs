//! The controller↔node agent API: the server runs in `strata node`, the client in the controller.
//! Every call carries a shared bearer token; a call without the right token is refused.

pub mod auth;
pub mod server;
