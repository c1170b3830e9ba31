//! TLS to PostgreSQL for the store: the adapter shared with the PostgreSQL
//! engine's admin connections lives in `keymint_client::postgres_tls`.

use std::path::Path;

pub use keymint_client::postgres_tls::{RustlsConnect, RustlsStream};

use crate::StoreError;

/// Trusts the CA certificates in `ca_file` (PEM), or the Mozilla roots.
pub fn connector(ca_file: Option<&Path>) -> Result<RustlsConnect, StoreError> {
    RustlsConnect::new(ca_file).map_err(|_| match ca_file {
        Some(p) => StoreError::Backend(format!(
            "`storage.ca_file` `{}` holds no readable PEM certificate",
            p.display()
        )),
        None => StoreError::Backend("TLS settings: cannot build the client configuration".into()),
    })
}
