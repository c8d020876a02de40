//! TLS (and mutual TLS) for the gRPC port, from PEM files named by flags.
//! The files are read once at start, so a bad path or a malformed PEM stops
//! the daemon with the flag named, rather than failing the first handshake.

use std::path::Path;

use anyhow::Context;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::ServeArgs;

/// The server's TLS settings, or `None` for plaintext.
pub fn server_config(args: &ServeArgs) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let identity = Identity::from_pem(read(cert, "--tls-cert")?, read(key, "--tls-key")?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &args.tls_client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca, "--tls-client-ca")?));
    }
    Ok(Some(config))
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))?;
    anyhow::ensure!(
        String::from_utf8_lossy(&pem).contains("-----BEGIN "),
        "{flag} {}: not a PEM file",
        path.display()
    );
    Ok(pem)
}
