//! The Kubernetes service-account token verifier: header and claim
//! parsing, the `crit` check, signature verification against a JWKS (the
//! fixture key's public half), issuer/audience/expiry checks.
#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use box_token_broker::auth::kubernetes::{KubernetesAuth, KubernetesConfig};
use libfuzzer_sys::fuzz_target;
use rsa::traits::PublicKeyParts as _;

const KEY: &str = include_str!("../../tests/fixtures/keys/pkcs1.pem");

fn verifier() -> &'static (tokio::runtime::Runtime, KubernetesAuth) {
    static VERIFIER: OnceLock<(tokio::runtime::Runtime, KubernetesAuth)> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let key = box_token_broker::boxapi::private_key::decode_private_key(KEY, None).expect("the fixture key");
        let b64 = |bytes: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let jwks = serde_json::json!({"keys": [{
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": "k8s-key-1",
            "n": b64(key.n().to_bytes_be()), "e": b64(key.e().to_bytes_be()),
        }]});
        let path = std::env::temp_dir().join(format!("box-broker-fuzz-jwks-{}.json", std::process::id()));
        std::fs::write(&path, jwks.to_string()).expect("a temporary JWKS file");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let auth = runtime
            .block_on(KubernetesAuth::new(KubernetesConfig {
                jwks_file: Some(path),
                issuer: "https://kubernetes.default.svc.cluster.local".to_owned(),
                audience: "box-token-broker".to_owned(),
                ..KubernetesConfig::default()
            }))
            .expect("the verifier");
        (runtime, auth)
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        let (runtime, auth) = verifier();
        let _ = runtime.block_on(auth.verify(token));
    }
});
