//! How the CLI's clients (`token`, `admin`) reach a broker: TCP in plaintext
//! or TLS (with a client certificate for mTLS), or a Unix socket; with an
//! API key from a file or the environment. Secrets are read from files,
//! never from arguments, and never printed.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use super::{EXIT_CONFIG, fail};

/// TLS options a CLI client shares.
#[derive(Debug, Clone, Args)]
pub(super) struct TlsArgs {
    /// TLS: the CA certificate (PEM) the broker's certificate must chain to.
    /// A `host:port` address then uses TLS.
    #[arg(long, value_name = "FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// mTLS: this client's certificate chain (PEM); with --key-file and --ca-file.
    #[arg(long, value_name = "FILE", global = true, requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// mTLS: the private key (PEM) of --cert-file.
    #[arg(long, value_name = "FILE", global = true, requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// The name the broker's certificate must carry (default: the address's host).
    #[arg(long, value_name = "NAME", global = true)]
    pub tls_server_name: Option<String>,
}

/// Where a CLI client connects, and what it presents.
#[derive(Debug)]
pub(super) struct Broker<'a> {
    /// `host:port`, `http://` or `https://host:port`, or `unix:PATH`
    /// (`unix:/abs/path`, `unix:///abs/path`, `unix:relative/path`).
    pub addr: &'a str,
    /// What the listener is called in errors ("the broker", "the admin listener").
    pub what: &'a str,
    /// TLS settings.
    pub tls: &'a TlsArgs,
    /// A file holding the API key to send as `x-api-key`.
    pub api_key_file: Option<&'a PathBuf>,
    /// The environment variable holding the key when no file is given.
    pub api_key_env: &'a str,
}

/// Adds the API key (if any) to every request, marked sensitive (HPACK
/// never indexes it; `Debug` never shows it).
#[derive(Clone)]
pub(super) struct ApiKey(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ApiKey(<redacted>)"
        } else {
            "ApiKey(None)"
        })
    }
}

impl Interceptor for ApiKey {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(key) = &self.0 {
            request.metadata_mut().insert(crate::auth::API_KEY_HEADER, key.clone());
        }
        Ok(request)
    }
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, ExitCode> {
    std::fs::read(path).map_err(|e| fail(EXIT_CONFIG, &format!("{}: cannot read {what}: {e}", path.display())))
}

impl Broker<'_> {
    /// Connects; a bad option or file is exit 64 naming it, an unreachable
    /// broker exit 1.
    pub(super) async fn connect(&self) -> Result<(Channel, ApiKey), ExitCode> {
        let key = self.api_key()?;
        let tls = self.tls_config()?;
        let addr = self.uri(tls.is_some())?;
        let mut endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|e| fail(EXIT_CONFIG, &format!("{addr} is not an address: {e}")))?;
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| fail(EXIT_CONFIG, &format!("the TLS settings are not usable: {e}")))?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            fail(
                1,
                &format!("cannot connect to {} at {addr}: {}", self.what, error_chain(&e)),
            )
        })?;
        Ok((channel, key))
    }

    /// The address as a URI tonic accepts.
    fn uri(&self, tls: bool) -> Result<String, ExitCode> {
        let addr = self.addr.trim();
        if addr.starts_with("unix:") {
            if tls {
                return Err(fail(
                    EXIT_CONFIG,
                    "TLS options were given for a Unix socket: a socket is reached without TLS",
                ));
            }
            return Ok(addr.to_owned());
        }
        match (addr.split_once("://"), tls) {
            (None, false) => Ok(format!("http://{addr}")),
            (None, true) => Ok(format!("https://{addr}")),
            (Some(("http", _)), true) => Err(fail(
                EXIT_CONFIG,
                &format!("{addr} is plaintext (http://) but TLS options were given: use https:// or host:port"),
            )),
            (Some(("https", _)), false) => Err(fail(
                EXIT_CONFIG,
                &format!("{addr} asks for TLS: give --ca-file, the CA that signed the broker's certificate"),
            )),
            (Some(("http" | "https", _)), _) => Ok(addr.to_owned()),
            (Some((scheme, _)), _) => Err(fail(
                EXIT_CONFIG,
                &format!("{addr}: unknown scheme {scheme}: use host:port, http://, https:// or unix:PATH"),
            )),
        }
    }

    fn api_key(&self) -> Result<ApiKey, ExitCode> {
        let key = match self.api_key_file {
            Some(file) => {
                let text = String::from_utf8(read(file, "the API key")?)
                    .map_err(|_| fail(EXIT_CONFIG, &format!("{}: the API key is not UTF-8", file.display())))?;
                Some(text.trim().to_owned())
            }
            None => std::env::var(self.api_key_env).ok().map(|k| k.trim().to_owned()),
        };
        match key.filter(|k| !k.is_empty()) {
            None => Ok(ApiKey(None)),
            Some(key) => MetadataValue::try_from(key.as_str())
                .map(|mut k| {
                    k.set_sensitive(true);
                    ApiKey(Some(k))
                })
                .map_err(|_| {
                    fail(
                        EXIT_CONFIG,
                        "the API key holds characters a header cannot (it must be printable ASCII)",
                    )
                }),
        }
    }

    fn tls_config(&self) -> Result<Option<ClientTlsConfig>, ExitCode> {
        let tls = self.tls;
        let Some(ca) = &tls.ca_file else {
            if tls.cert_file.is_some() || tls.tls_server_name.is_some() {
                return Err(fail(
                    EXIT_CONFIG,
                    "--cert-file and --tls-server-name need --ca-file, the CA that signed the broker's certificate",
                ));
            }
            return Ok(None);
        };
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(certificates(ca, "the CA certificate")?));
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            let pem = read(key, "the client key")?;
            {
                use rustls::pki_types::{PrivateKeyDer, pem::PemObject as _};
                PrivateKeyDer::from_pem_slice(&pem)
                    .map_err(|e| fail(EXIT_CONFIG, &format!("{}: not a PEM private key: {e}", key.display())))?;
            }
            config = config.identity(Identity::from_pem(certificates(cert, "the client certificate")?, pem));
        }
        if let Some(name) = &tls.tls_server_name {
            config = config.domain_name(name.clone());
        }
        Ok(Some(config))
    }
}

/// A PEM file of at least one certificate.
fn certificates(path: &PathBuf, what: &str) -> Result<Vec<u8>, ExitCode> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let pem = read(path, what)?;
    let count = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(EXIT_CONFIG, &format!("{}: {what} is not PEM: {e}", path.display())))?
        .len();
    if count == 0 {
        return Err(fail(
            EXIT_CONFIG,
            &format!("{}: {what} holds no PEM certificate", path.display()),
        ));
    }
    Ok(pem)
}

/// An error and its causes on one line (tonic's "transport error" alone
/// says nothing).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_api_key_is_sensitive_and_never_shown() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("key");
        std::fs::write(&file, "the-api-key-1234\n").unwrap_or_else(|e| panic!("{e}"));
        let tls = super::TlsArgs {
            ca_file: None,
            cert_file: None,
            key_file: None,
            tls_server_name: None,
        };
        let broker = super::Broker {
            addr: "127.0.0.1:1",
            what: "the broker",
            tls: &tls,
            api_key_file: Some(&file),
            api_key_env: "BOX_BROKER_TEST_NO_SUCH_VARIABLE",
        };
        let key = broker
            .api_key()
            .map_err(|_| "unreadable")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
        assert!(key.0.as_ref().is_some_and(tonic::metadata::MetadataValue::is_sensitive));
    }
}
