//! The cost of signing one JWT assertion (RS256 with a 2048-bit key), alone:
//! the CPU work of every cold mint. `cargo bench --bench signing`.

// A benchmark: a setup failure is a bug to see at once, so it panics.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark's setup failure is a bug to see at once"
)]

use std::hint::black_box;

use box_token_broker::boxapi::{
    BoxId, BoxSubject, JwtAlgorithm, SigningKey,
    assertion::{Claims, sign},
};
use criterion::{Criterion, criterion_group, criterion_main};

fn signing(c: &mut Criterion) {
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("a key");
    let signing = SigningKey::new("bench", &key).expect("a signing key");
    let subject = BoxSubject::Enterprise(BoxId::parse("7000001").expect("an id"));
    let mut group = c.benchmark_group("assertion");
    for algorithm in [JwtAlgorithm::RS256, JwtAlgorithm::RS512] {
        group.bench_function(format!("sign {algorithm:?} 2048-bit"), |b| {
            b.iter(|| {
                let claims = Claims::new("clientid0123456789", &subject, box_token_broker::clock::system_now());
                black_box(sign(&claims, &signing, algorithm).expect("signed"))
            });
        });
    }
    group.finish();
}

criterion_group!(benches, signing);
criterion_main!(benches);
