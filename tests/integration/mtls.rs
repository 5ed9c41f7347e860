//! mTLS: the broker serves TLS, requires client certificates from the
//! configured CA, and takes the caller's identity from the certificate's URI
//! SAN (SPIFFE ID) or DNS SAN. A listener configured to accept certificates
//! and API keys lets a caller without a certificate use a key.

use crate::common;

use std::sync::Arc;

use box_token_broker::service::{ClientCertificates, ServerTls};
use box_token_broker::{
    audit::AuditSink,
    auth::{Anonymous, Authenticator},
    pb::token_broker_service_client::TokenBrokerServiceClient,
    policy::Policy,
    runtime::Runtime,
    service::{self, Listener},
};
use common::pki::{Pki, dns, uri};
use common::{Harness, Options, assert_status, enterprise, token_of};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

pub(crate) const SPIFFE: &str = "spiffe://cluster.local/ns/portal/sa/web";

const POLICY: &str = "[[rules]]\nname = \"portal pods\"\ncallers = [\"spiffe://cluster.local/ns/portal/*\", \"dns:billing.internal\", \"apikey:billing.internal\"]\nenterprise = true\nfull_tokens = true\n";

/// Serves the harness's broker with mTLS; returns the address and the audit buffer.
pub(crate) async fn serve_mtls(h: &Harness, pki: &Pki) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
    serve_tls(h, server_tls(pki), Authenticator::new(Anonymous::Refused).with_mtls()).await
}

/// The broker's TLS: a certificate for `localhost` from `pki`, client
/// certificates required from the same CA.
fn server_tls(pki: &Pki) -> ServerTls {
    let (cert, key) = pki.issue(vec![dns("localhost")]);
    ServerTls::from_pem(
        cert.as_bytes(),
        key.as_bytes(),
        Some((pki.ca.pem().as_bytes(), ClientCertificates::Required)),
    )
    .unwrap()
}

async fn serve_tls(
    h: &Harness,
    tls: ServerTls,
    auth: Authenticator,
) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sink, audit) = AuditSink::memory();
    let broker = h.broker.clone();
    tokio::spawn(
        Runtime::new(broker, Arc::new(sink))
            .listen(Listener::Tls(listener, auth, tls), service::Role::Client)
            .run(std::future::pending()),
    );
    (addr, audit)
}

async fn client(
    addr: std::net::SocketAddr,
    server_ca: &Pki,
    client: Option<(String, String)>,
) -> Result<TokenBrokerServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca.ca.pem()))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(TokenBrokerServiceClient::new(channel))
}

/// The `caller` of each audit record, in order.
pub(crate) fn audited_callers(audit: &std::sync::Mutex<Vec<u8>>) -> Vec<String> {
    let audit = String::from_utf8(audit.lock().unwrap().clone()).unwrap();
    audit
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["caller"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

pub(crate) async fn harness() -> Harness {
    Harness::with(Options {
        policy: Some(Policy::parse(POLICY, "p").unwrap()),
        allow_anonymous: false,
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn a_spiffe_uri_san_is_the_callers_identity() {
    let h = harness().await;
    let pki = Pki::new();
    let (addr, audit) = serve_mtls(&h, &pki).await;
    let mut c = client(addr, &pki, Some(pki.issue(vec![uri(SPIFFE), dns("web.portal.svc")])))
        .await
        .unwrap();
    assert_eq!(
        token_of(&c.get_token(enterprise()).await.unwrap().into_inner()).len(),
        32
    );
    let audit = String::from_utf8(audit.lock().unwrap().clone()).unwrap();
    assert!(
        audit.contains(&format!("\"caller\":\"{SPIFFE}\"")),
        "the URI SAN wins over the DNS SAN: {audit}"
    );
}

#[tokio::test]
async fn each_certificate_keeps_its_own_identity_over_many_requests() {
    // Identities are remembered per certificate (by its SHA-256): clients
    // with different certificates, taking turns, must never get each other's.
    let h = harness().await;
    let pki = Pki::new();
    let (addr, audit) = serve_mtls(&h, &pki).await;
    let other = "spiffe://cluster.local/ns/portal/sa/api";
    let mut web = client(addr, &pki, Some(pki.issue(vec![uri(SPIFFE)]))).await.unwrap();
    let mut api = client(addr, &pki, Some(pki.issue(vec![uri(other)]))).await.unwrap();
    for _ in 0..3 {
        web.get_token(enterprise()).await.unwrap();
        api.get_token(enterprise()).await.unwrap();
    }
    let callers = audited_callers(&audit);
    assert_eq!(callers, [SPIFFE, other, SPIFFE, other, SPIFFE, other]);
}

#[tokio::test]
async fn a_dns_san_is_the_identity_when_there_is_no_uri() {
    let h = harness().await;
    let pki = Pki::new();
    let (addr, audit) = serve_mtls(&h, &pki).await;
    let mut c = client(addr, &pki, Some(pki.issue(vec![dns("billing.internal")])))
        .await
        .unwrap();
    c.get_token(enterprise()).await.unwrap();
    assert!(
        String::from_utf8(audit.lock().unwrap().clone())
            .unwrap()
            .contains("\"caller\":\"dns:billing.internal\"")
    );
}

#[tokio::test]
async fn a_certificate_never_takes_an_api_key_identity_of_the_same_name() {
    // Before identities named their mechanism, a certificate with DNS SAN
    // "customer-portal" was the API key identity "customer-portal".
    let h = Harness::with(Options {
        policy: Some(
            Policy::parse(
                "[[rules]]\nname = \"portal key\"\ncallers = [\"apikey:customer-portal\"]\nenterprise = true\nfull_tokens = true\n",
                "p",
            )
            .unwrap(),
        ),
        allow_anonymous: false,
        ..Options::default()
    })
    .await;
    let pki = Pki::new();
    let (addr, audit) = serve_mtls(&h, &pki).await;
    let mut c = client(addr, &pki, Some(pki.issue(vec![dns("customer-portal")])))
        .await
        .unwrap();
    assert_status(
        &c.get_token(enterprise()).await.unwrap_err(),
        Code::PermissionDenied,
        "no policy rule grants anything to caller \"dns:customer-portal\"",
    );
    assert_eq!(audited_callers(&audit), ["dns:customer-portal"]);
    assert_eq!(h.fake.stats().token_requests, 0);
}

#[tokio::test]
async fn a_certificate_identity_outside_the_policy_is_denied() {
    let h = harness().await;
    let pki = Pki::new();
    let (addr, _) = serve_mtls(&h, &pki).await;
    let mut c = client(
        addr,
        &pki,
        Some(pki.issue(vec![uri("spiffe://cluster.local/ns/other/sa/x")])),
    )
    .await
    .unwrap();
    assert_status(
        &c.get_token(enterprise()).await.unwrap_err(),
        Code::PermissionDenied,
        "spiffe://cluster.local/ns/other/sa/x",
    );
}

#[tokio::test]
async fn clients_without_a_certificate_from_the_ca_get_nothing() {
    let h = harness().await;
    let pki = Pki::new();
    let (addr, _) = serve_mtls(&h, &pki).await;
    // No client certificate: the handshake (or the first call) fails.
    let no_cert = match client(addr, &pki, None).await {
        Ok(mut c) => c.get_token(enterprise()).await.is_err(),
        Err(_) => true,
    };
    assert!(no_cert, "a client without a certificate is refused");
    // A certificate from another CA: likewise.
    let rogue = Pki::new();
    let rogue_cert = match client(addr, &pki, Some(rogue.issue(vec![uri(SPIFFE)]))).await {
        Ok(mut c) => c.get_token(enterprise()).await.is_err(),
        Err(_) => true,
    };
    assert!(rogue_cert, "a certificate from another CA is refused");
    assert_eq!(h.fake.stats().token_requests, 0, "nothing reached Box");
}

#[tokio::test]
async fn a_listener_accepting_certificates_and_api_keys_takes_either() {
    let h = harness().await;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki.issue(vec![dns("localhost")]);
    std::fs::write(dir.path().join("tls.crt"), cert).unwrap();
    std::fs::write(dir.path().join("tls.key"), key).unwrap();
    std::fs::write(dir.path().join("ca.crt"), pki.ca.pem()).unwrap();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"billing-key-1"));
    let config_file = dir.path().join("broker.toml");
    std::fs::write(
        &config_file,
        format!(
            "[server]\naccept = [\"client_certificate\", \"api_key\"]\n\
             [server.tls]\ncert_file = \"tls.crt\"\nkey_file = \"tls.key\"\nclient_ca_file = \"ca.crt\"\n\
             [[auth.api_keys]]\nidentity = \"billing.internal\"\nsha256 = \"{sha}\"\n\
             [apps.default]\nbox_config_file = \"unused.json\"\n"
        ),
    )
    .unwrap();
    let config = box_token_broker::config::Config::load(&config_file, std::iter::empty()).unwrap();
    let tls = box_token_broker::runtime::client_tls(&config).unwrap().unwrap();
    let (addr, audit) = serve_tls(
        &h,
        tls,
        box_token_broker::runtime::authenticator(&config).await.unwrap(),
    )
    .await;

    // A certificate is an identity...
    let mut with_cert = client(addr, &pki, Some(pki.issue(vec![uri(SPIFFE)]))).await.unwrap();
    with_cert.get_token(enterprise()).await.unwrap();
    // ...and so is an API key, from a caller without a certificate.
    let mut without_cert = client(addr, &pki, None).await.unwrap();
    let mut request = tonic::Request::new(enterprise());
    request
        .metadata_mut()
        .insert("x-api-key", "billing-key-1".parse().unwrap());
    without_cert.get_token(request).await.unwrap();
    // Neither: refused, saying what this listener accepts.
    assert_status(
        &without_cert.get_token(enterprise()).await.unwrap_err(),
        Code::Unauthenticated,
        "this listener accepts a client certificate from the configured CA, or an API key in the x-api-key header",
    );
    let callers = audited_callers(&audit);
    assert_eq!(callers, [SPIFFE, "apikey:billing.internal", "unauthenticated"]);
}

#[tokio::test]
async fn the_admin_listener_takes_client_certificates_as_admin_identities() {
    use box_token_broker::{
        admin::{AdminRules, KeyAdmin},
        pb::{GetStatusRequest, broker_admin_service_client::BrokerAdminServiceClient},
    };
    let h = harness().await;
    let pki = Pki::new();
    let tls = server_tls(&pki);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admin = Arc::new(KeyAdmin::open(h.broker.clone(), None).unwrap());
    let (sink, audit) = AuditSink::memory();
    tokio::spawn(
        Runtime::new(h.broker.clone(), Arc::new(sink))
            .listen(
                Listener::Tls(listener, Authenticator::new(Anonymous::Refused).with_mtls(), tls),
                service::Role::Admin(admin, AdminRules::allow_everything("dns:ops.internal")),
            )
            .run(std::future::pending()),
    );
    let channel = |sans| {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pki.ca.pem()))
            .domain_name("localhost")
            .identity({
                let (c, k) = pki.issue(sans);
                Identity::from_pem(c, k)
            });
        async move {
            Channel::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap()
        }
    };
    let mut ops = BrokerAdminServiceClient::new(channel(vec![dns("ops.internal")]).await);
    let status = ops.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert!(!status.key_store, "this admin has no key store");
    let mut other = BrokerAdminServiceClient::new(channel(vec![dns("web.portal.svc")]).await);
    assert_status(
        &other.get_status(GetStatusRequest {}).await.unwrap_err(),
        Code::PermissionDenied,
        "admin identity \"dns:web.portal.svc\" may not call GetStatus",
    );
    let audit = String::from_utf8(audit.lock().unwrap().clone()).unwrap();
    assert!(audit.contains("\"caller\":\"dns:ops.internal\"") && audit.contains("\"caller\":\"dns:web.portal.svc\""));
}
