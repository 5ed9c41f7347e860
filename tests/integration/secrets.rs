//! Secrets never leak: not through `Debug`, not into logs, not into error
//! messages.

use crate::common;

use box_token_broker::{
    boxapi::{BoxId, BoxSubject, CredentialSources, Target},
    broker::{Subject, TokenRequest},
    fakebox::{FakeAuth, Fault, seed},
};
use common::{
    Harness, Options, assert_free_of, enterprise, external, fixture, key_material, provisioning, token_of, user,
};
use secrecy::ExposeSecret as _;

#[tokio::test]
async fn debug_output_hides_every_secret() {
    let h = Harness::start().await;
    let app = h.broker.resolve_app(None).unwrap();
    let lookup = h
        .broker
        .get_token(
            &std::sync::Arc::from("anonymous"),
            &TokenRequest {
                app: None,
                subject: Subject::Enterprise,
                min_ttl: Default::default(),
                force_refresh: false,
            },
        )
        .await
        .unwrap()
        .lookup;
    let issued = app
        .client
        .request_token(
            &app.credentials().unwrap(),
            &BoxSubject::User(BoxId::parse(seed::APP_USER_IDS[0]).unwrap()),
        )
        .await
        .unwrap();
    let response = h.get(enterprise()).await.unwrap();
    let downscoped = h
        .downscoped(common::downscope(
            enterprise(),
            &["item_preview"],
            common::folder(seed::SERVICE_ACCOUNT_FOLDER_ID),
        ))
        .await
        .unwrap();
    let revoke = box_token_broker::pb::RevokeTokenRequest {
        app: String::new(),
        access_token: token_of(&response),
    };
    let console = CredentialSources {
        box_config_file: Some(fixture("box_config.json")),
        ..Default::default()
    }
    .load("x")
    .unwrap();

    let mut secrets = key_material();
    secrets.push(h.app.client_secret.expose_secret().to_owned());
    secrets.push("fixture-client-secret-0123456789".to_owned());
    secrets.push(lookup.token.access_token.expose_secret().to_owned());
    secrets.push(issued.access_token.expose_secret().to_owned());
    secrets.push(token_of(&response));
    secrets.push(downscoped.token.as_ref().unwrap().access_token.clone());

    // A shared link can itself be a capability: records and Debug show only
    // its fingerprint.
    let shared_link = "https://app.box.com/s/k7secretcapabilitylink";
    secrets.push("k7secretcapabilitylink".to_owned());
    let audit_event = box_token_broker::audit::AuditEvent {
        issued: Some(lookup.token.clone()),
        downscope: Some(std::sync::Arc::new(box_token_broker::boxapi::Downscope {
            scopes: vec!["item_preview".to_owned()],
            target: Target::shared_link(shared_link).ok(),
        })),
        ..Default::default()
    };
    assert!(format!("{audit_event:?}").contains("SharedLink(sha256:"));
    let debug = format!(
        "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        app.credentials(),
        app.ring(),
        console,
        app,
        lookup,
        issued,
        response,
        response.token,
        h.app,
        h.broker,
        downscoped,
        revoke,
        audit_event
    );
    assert!(debug.contains("****"), "secrets are shown as ****");
    assert!(debug.contains(&h.app.client_id), "non-secret ids stay visible");
    assert_free_of(&debug, &secrets, "Debug output");
}

#[tokio::test]
async fn logs_and_errors_of_a_full_scenario_hold_no_secret() {
    // Everything this crate emits, down to TRACE, plus dependencies at INFO.
    let captured = &common::observed().logs;

    let mut secrets = key_material();
    let mut messages = Vec::new();

    // JWT: enterprise, App User, Managed User, a forced refresh, and failures.
    let h = Harness::start().await;
    secrets.push(h.app.client_secret.expose_secret().to_owned());
    for request in [enterprise(), user(seed::APP_USER_IDS[0]), user(seed::MANAGED_USER_ID)] {
        secrets.push(token_of(&h.get(request).await.unwrap()));
    }
    let mut force = enterprise();
    force.force_refresh = true;
    secrets.push(token_of(&h.get(force).await.unwrap()));
    let child = h
        .downscoped(common::downscope(
            user(seed::APP_USER_IDS[0]),
            &["item_preview"],
            common::folder(seed::APP_USER_FOLDER_ID),
        ))
        .await
        .unwrap();
    let child = child.token.unwrap().access_token;
    secrets.push(child.clone());
    h.revoke(&child).await.unwrap();
    messages.push(h.revoke(&child).await.unwrap_err().message().to_owned());
    h.fake.set_omit_restrictions(true);
    messages.push(
        h.downscoped(common::downscope(
            enterprise(),
            &["item_preview"],
            common::folder(seed::SERVICE_ACCOUNT_FOLDER_ID),
        ))
        .await
        .unwrap_err()
        .message()
        .to_owned(),
    );
    h.fake.set_omit_restrictions(false);
    // Users: by external id, created on first use, refused, the users API
    // failing, and the /users/me fallback (the user's own token, revoked).
    secrets.push(token_of(
        &h.get(external(seed::APP_USER_EXTERNAL_IDS[0])).await.unwrap(),
    ));
    secrets.push(token_of(
        &h.get(provisioning("auth0|secret-scenario", "Sam")).await.unwrap(),
    ));
    messages.push(h.get(user(seed::ADMIN_USER_ID)).await.unwrap_err().message().to_owned());
    h.fake.fail_next_users(4, Fault::ServerError { status: 503 });
    messages.push(
        h.get(user(seed::INACTIVE_USER_ID))
            .await
            .unwrap_err()
            .message()
            .to_owned(),
    );
    h.fake.set_user_scopes(&h.app.client_id, &[]);
    messages.push(
        h.get(user(seed::COADMIN_USER_ID))
            .await
            .unwrap_err()
            .message()
            .to_owned(),
    );
    h.fake
        .set_user_scopes(&h.app.client_id, &["manage_app_users", "manage_managed_users"]);
    h.fake.fail_next(1, Fault::RateLimited { retry_after_secs: 30 });
    messages.push(
        h.get(user(seed::APP_USER_IDS[1]))
            .await
            .unwrap_err()
            .message()
            .to_owned(),
    );
    messages.push(
        h.get(user(seed::EXTERNAL_USER_ID))
            .await
            .unwrap_err()
            .message()
            .to_owned(),
    );
    messages.push(h.get(user("not-a-number")).await.unwrap_err().message().to_owned());
    h.fake.update_app(&h.app.client_id, |a| a.authorized = false);
    messages.push(
        h.get(user(seed::APP_USER_IDS[2]))
            .await
            .unwrap_err()
            .message()
            .to_owned(),
    );

    // A wrong client secret: the configured (wrong) secret must not leak either.
    let wrong = Harness::with(Options {
        client_secret: Some("canary-wrong-secret-77"),
        ..Options::default()
    })
    .await;
    secrets.push("canary-wrong-secret-77".to_owned());
    secrets.push(wrong.app.client_secret.expose_secret().to_owned());
    messages.push(wrong.get(enterprise()).await.unwrap_err().message().to_owned());

    // CCG.
    let ccg = Harness::with(Options {
        auth: FakeAuth::Ccg,
        ..Options::default()
    })
    .await;
    secrets.push(ccg.app.client_secret.expose_secret().to_owned());
    secrets.push(token_of(&ccg.get(enterprise()).await.unwrap()));
    messages.push(
        ccg.get(user(seed::EXTERNAL_USER_ID))
            .await
            .unwrap_err()
            .message()
            .to_owned(),
    );

    let logs = captured.text();
    assert!(logs.contains("minted a Box token"), "the scenario was logged:\n{logs}");
    assert!(
        logs.contains("minting a Box token failed"),
        "failures were logged:\n{logs}"
    );
    assert!(
        logs.contains("downscoped a Box token") && logs.contains("revoked a Box token"),
        "{logs}"
    );
    assert!(logs.contains("refusing a downscoped token"), "{logs}");
    assert!(
        logs.contains("a Box users API call failed") && logs.contains("created an App User"),
        "{logs}"
    );
    assert_free_of(&logs, &secrets, "the log");
    assert_free_of(&messages.join("\n"), &secrets, "error messages");
}
