//! The deny-by-default policy: the worked examples for the four Box user
//! models, and a caller × request matrix over gRPC with its audit trail.

use crate::common;

use std::path::PathBuf;

use box_token_broker::{
    boxapi::{BoxId, Target},
    fakebox::seed,
    pb,
    policy::{Ask, Decision, Policy, PolicySubject, Request},
};
use common::{Harness, Options, assert_status, downscope, enterprise, file, folder, token_of, user};
use tonic::{Code, metadata::MetadataValue};

fn example(name: &str) -> Policy {
    Policy::load(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("examples/policies")
            .join(name),
    )
    .unwrap()
}

fn allowed(policy: &Policy, caller: &str, subject: PolicySubject<'_>, ask: Ask<'_>) -> bool {
    matches!(
        policy.decide(&Request {
            caller,
            app: "default",
            subject,
            ask,
            min_ttl: std::time::Duration::ZERO,
            force_refresh: false,
        }),
        Decision::Allow { .. }
    )
}

fn scopes(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| (*s).to_owned()).collect()
}

fn folder_target(id: &str) -> Target {
    Target::Folder(BoxId::parse(id).unwrap())
}

#[test]
fn system_to_system_gets_enterprise_tokens_only() {
    let p = example("system-to-system.toml");
    assert!(allowed(&p, "apikey:billing-sync", PolicySubject::Enterprise, Ask::Full));
    assert!(!allowed(
        &p,
        "apikey:billing-sync",
        PolicySubject::User("7200001"),
        Ask::Full
    ));
    assert!(!allowed(&p, "someone-else", PolicySubject::Enterprise, Ask::Full));
}

#[test]
fn service_account_portal_gets_only_downscoped_tokens_for_its_folder() {
    let p = example("service-account-portal.toml");
    let preview = scopes(&["item_preview"]);
    let portal = folder_target(seed::SERVICE_ACCOUNT_FOLDER_ID);
    let elsewhere = folder_target("999");
    assert!(allowed(
        &p,
        "system:serviceaccount:portal:public-portal",
        PolicySubject::Enterprise,
        Ask::Downscoped {
            scopes: &preview,
            target: Some(&portal)
        }
    ));
    assert!(!allowed(
        &p,
        "system:serviceaccount:portal:public-portal",
        PolicySubject::Enterprise,
        Ask::Full
    ));
    assert!(!allowed(
        &p,
        "system:serviceaccount:portal:public-portal",
        PolicySubject::Enterprise,
        Ask::Downscoped {
            scopes: &preview,
            target: Some(&elsewhere)
        }
    ));
    let write = scopes(&["item_upload"]);
    assert!(!allowed(
        &p,
        "system:serviceaccount:portal:public-portal",
        PolicySubject::Enterprise,
        Ask::Downscoped {
            scopes: &write,
            target: Some(&portal)
        }
    ));
}

#[test]
fn app_user_portal_gets_downscoped_tokens_for_its_own_users_by_their_external_ids() {
    let p = example("app-user-portal.toml");
    let preview = scopes(&["item_preview", "base_explorer"]);
    let theirs = folder_target(seed::APP_USER_FOLDER_ID);
    let ada = PolicySubject::ExternalUser {
        id: "auth0|ada",
        provision: false,
    };
    let downscoped = |subject| {
        allowed(
            &p,
            "apikey:customer-portal",
            subject,
            Ask::Downscoped {
                scopes: &preview,
                target: Some(&theirs),
            },
        )
    };
    assert!(downscoped(ada));
    assert!(
        downscoped(PolicySubject::ExternalUser {
            id: "auth0|new",
            provision: true
        }),
        "a new customer's App User may be created"
    );
    assert!(!allowed(&p, "apikey:customer-portal", ada, Ask::Full));
    assert!(
        !downscoped(PolicySubject::ExternalUser {
            id: "google|ada",
            provision: false
        }),
        "only its identity provider's ids"
    );
    assert!(!downscoped(PolicySubject::User("7200001")), "no Box user ids");
    assert!(!downscoped(PolicySubject::Enterprise));
    assert!(!allowed(
        &p,
        "apikey:customer-portal",
        ada,
        Ask::Downscoped {
            scopes: &preview,
            target: None
        }
    ));
}

#[test]
fn classic_lets_an_internal_app_have_managed_user_tokens_and_never_external_users() {
    let p = example("classic.toml");
    assert!(allowed(
        &p,
        "apikey:hr-app",
        PolicySubject::User(seed::MANAGED_USER_ID),
        Ask::Full
    ));
    assert!(!allowed(
        &p,
        "apikey:hr-app",
        PolicySubject::User(seed::APP_USER_IDS[0]),
        Ask::Full
    ));
    assert!(!allowed(
        &p,
        "apikey:hr-app",
        PolicySubject::User(seed::EXTERNAL_USER_ID),
        Ask::Full
    ));
    assert!(!allowed(
        &p,
        "apikey:customer-portal",
        PolicySubject::User(seed::EXTERNAL_USER_ID),
        Ask::Full
    ));
    assert!(!allowed(
        &p,
        "apikey:customer-portal",
        PolicySubject::ExternalUser {
            id: "auth0|ada",
            provision: true
        },
        Ask::Full
    ));
    let preview = scopes(&["item_preview"]);
    let theirs = folder_target(seed::APP_USER_FOLDER_ID);
    assert!(allowed(
        &p,
        "apikey:customer-portal",
        PolicySubject::User("7200001"),
        Ask::Downscoped {
            scopes: &preview,
            target: Some(&theirs)
        }
    ));
}

// The same over gRPC, with API keys and the audit trail.

const HR_KEY: &str = "hr-key-0001";
const PORTAL_KEY: &str = "portal-key-0002";
const BILLING_KEY: &str = "billing-key-0003";

async fn classic() -> Harness {
    Harness::with(Options {
        policy: Some(example("classic.toml")),
        allow_anonymous: false,
        api_keys: vec![
            ("hr-app", HR_KEY),
            ("customer-portal", PORTAL_KEY),
            ("billing-sync", BILLING_KEY),
        ],
        ..Options::default()
    })
    .await
}

fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-api-key", MetadataValue::try_from(key).unwrap());
    request
}

async fn get(h: &Harness, key: &str, message: pb::GetTokenRequest) -> Result<pb::GetTokenResponse, tonic::Status> {
    h.client
        .clone()
        .get_token(with_key(message, key))
        .await
        .map(tonic::Response::into_inner)
}

async fn downscoped(
    h: &Harness,
    key: &str,
    message: pb::GetDownscopedTokenRequest,
) -> Result<pb::GetDownscopedTokenResponse, tonic::Status> {
    h.client
        .clone()
        .get_downscoped_token(with_key(message, key))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn callers_get_what_the_policy_allows_and_nothing_more() {
    let h = classic().await;
    // Allowed.
    get(&h, HR_KEY, user(seed::MANAGED_USER_ID)).await.unwrap();
    downscoped(
        &h,
        PORTAL_KEY,
        downscope(
            user(seed::APP_USER_IDS[0]),
            &["item_preview"],
            folder(seed::APP_USER_FOLDER_ID),
        ),
    )
    .await
    .unwrap();
    // Escalations: each refused, naming what is not allowed.
    let cases: Vec<(Result<(), tonic::Status>, &str)> = vec![
        (
            get(&h, PORTAL_KEY, user(seed::APP_USER_IDS[0])).await.map(drop),
            "full (un-downscoped) tokens are not allowed",
        ),
        (
            downscoped(
                &h,
                PORTAL_KEY,
                downscope(
                    user(seed::APP_USER_IDS[0]),
                    &["item_preview", "item_delete"],
                    folder(seed::APP_USER_FOLDER_ID),
                ),
            )
            .await
            .map(drop),
            "scope \"item_delete\" is not allowed",
        ),
        (
            downscoped(
                &h,
                PORTAL_KEY,
                downscope(
                    user(seed::MANAGED_USER_ID),
                    &["item_preview"],
                    folder(seed::APP_USER_FOLDER_ID),
                ),
            )
            .await
            .map(drop),
            "user 7300001 is not allowed",
        ),
        (
            downscoped(
                &h,
                PORTAL_KEY,
                downscope(user(seed::APP_USER_IDS[0]), &["item_preview"], None),
            )
            .await
            .map(drop),
            "without a target is not allowed",
        ),
        (
            get(&h, HR_KEY, user(seed::APP_USER_IDS[0])).await.map(drop),
            "user 7200001 is not allowed",
        ),
        (
            get(&h, HR_KEY, user(seed::EXTERNAL_USER_ID)).await.map(drop),
            "user 7400001 is not allowed",
        ),
        (
            get(&h, HR_KEY, enterprise()).await.map(drop),
            "the Service Account (enterprise) is not allowed",
        ),
        (
            get(&h, BILLING_KEY, enterprise()).await.map(drop),
            "no policy rule grants anything to caller \"apikey:billing-sync\"",
        ),
    ];
    for (result, fragment) in cases {
        assert_status(&result.unwrap_err(), Code::PermissionDenied, fragment);
    }
    let stats = h.fake.stats();
    assert_eq!(
        (stats.jwt_issued, stats.exchange_issued),
        (3, 1),
        "denied requests never reach Box (allowed: a user's mint, the Service Account's that checked the user, an exchange)"
    );
}

#[tokio::test]
async fn missing_or_wrong_credentials_are_unauthenticated() {
    let h = classic().await;
    assert_status(
        &h.get(enterprise()).await.unwrap_err(),
        Code::Unauthenticated,
        "no credentials",
    );
    let s = get(&h, "guessed-key", enterprise()).await.unwrap_err();
    assert_status(&s, Code::Unauthenticated, "not hold a valid API key");
    assert!(!s.message().contains("guessed-key"));
}

#[tokio::test]
async fn revocation_is_allowed_only_for_tokens_the_caller_may_have() {
    let h = classic().await;
    let child = downscoped(
        &h,
        PORTAL_KEY,
        downscope(
            user(seed::APP_USER_IDS[0]),
            &["item_preview"],
            file(seed::APP_USER_FILE_ID),
        ),
    )
    .await
    .unwrap();
    let token = child.token.unwrap().access_token;
    let revoke = |key: &'static str, token: String| {
        let mut client = h.client.clone();
        async move {
            client
                .revoke_token(with_key(
                    pb::RevokeTokenRequest {
                        app: String::new(),
                        access_token: token,
                    },
                    key,
                ))
                .await
        }
    };
    assert_status(
        &revoke(HR_KEY, token.clone()).await.unwrap_err(),
        Code::PermissionDenied,
        "no rule grants revoke = true to caller \"apikey:hr-app\"",
    );
    assert!(!h.fake.is_revoked(&token));
    revoke(PORTAL_KEY, token.clone()).await.unwrap();
    assert!(h.fake.is_revoked(&token));
}

#[tokio::test]
async fn every_decision_is_audited_without_the_token() {
    let h = classic().await;
    let full = token_of(&get(&h, HR_KEY, user(seed::MANAGED_USER_ID)).await.unwrap());
    let again = get(&h, HR_KEY, user(seed::MANAGED_USER_ID)).await.unwrap();
    let child = downscoped(
        &h,
        PORTAL_KEY,
        downscope(
            user(seed::APP_USER_IDS[0]),
            &["item_preview"],
            folder(seed::APP_USER_FOLDER_ID),
        ),
    )
    .await
    .unwrap();
    let child = child.token.unwrap().access_token;
    get(&h, PORTAL_KEY, user(seed::APP_USER_IDS[0])).await.unwrap_err();
    h.get(enterprise()).await.unwrap_err();
    h.fake
        .fail_next(4, box_token_broker::fakebox::Fault::ServerError { status: 503 });
    // Past the forced-refresh interval, so the forced request asks Box.
    h.clock.advance(std::time::Duration::from_secs(6));
    let mut forced = user(seed::MANAGED_USER_ID);
    forced.force_refresh = true;
    assert_eq!(get(&h, HR_KEY, forced).await.unwrap_err().code(), Code::Unavailable);

    let events = h.audit_events();
    assert_eq!(events.len(), 6, "{events:#?}");
    let raw = String::from_utf8(h.audit.lock().unwrap().clone()).unwrap();
    assert!(
        !raw.contains(&full) && !raw.contains(&child),
        "no token in the audit trail"
    );

    let issued = &events[0];
    assert_eq!(issued["decision"], "allow");
    assert_eq!(issued["rpc"], "GetToken");
    assert_eq!(issued["caller"], "apikey:hr-app");
    assert_eq!(issued["rule"], "internal HR app");
    assert_eq!(issued["subject_type"], "user");
    assert_eq!(issued["subject_id"], seed::MANAGED_USER_ID);
    assert_eq!(issued["cache_hit"], false);
    assert_eq!(
        issued["token_sha256"],
        box_token_broker::fingerprint::fingerprint(&full)
    );
    assert!(issued["box_request_id"].as_str().is_some_and(|id| !id.is_empty()));
    assert_eq!(events[1]["cache_hit"], again.cache_hit);

    let down = &events[2];
    assert_eq!(down["rpc"], "GetDownscopedToken");
    assert_eq!(down["scopes"], serde_json::json!(["item_preview"]));
    assert_eq!(down["target"], format!("folder:{}", seed::APP_USER_FOLDER_ID));
    assert_eq!(down["token_sha256"], box_token_broker::fingerprint::fingerprint(&child));

    let denied = &events[3];
    assert_eq!(
        (denied["decision"].as_str(), denied["code"].as_str()),
        (Some("deny"), Some("PERMISSION_DENIED"))
    );
    // The request left `app` empty and one app is configured: the record
    // names it, refused or not.
    assert_eq!(denied["app"], "default", "{denied}");
    assert!(
        denied["reason"]
            .as_str()
            .unwrap()
            .contains("full (un-downscoped) tokens are not allowed")
    );
    assert!(denied.get("token_sha256").is_none());

    let unauthenticated = &events[4];
    assert_eq!(
        (unauthenticated["decision"].as_str(), unauthenticated["caller"].as_str()),
        (Some("deny"), Some("unauthenticated"))
    );
    assert!(
        events
            .iter()
            .all(|e| e["time"].as_str().is_some_and(|t| t.ends_with('Z')))
    );
}

#[tokio::test]
async fn without_a_policy_every_request_is_denied() {
    let h = Harness::with(Options {
        policy: Some(Policy::default()),
        ..Options::default()
    })
    .await;
    assert_status(
        &h.get(enterprise()).await.unwrap_err(),
        Code::PermissionDenied,
        "no policy rule grants anything to caller \"anonymous\"",
    );
    assert_eq!(h.fake.stats().token_requests, 0);
}

// Hot reload.

const FOR_SOMEONE_ELSE: &str =
    "[[rules]]\nname = \"other\"\ncallers = [\"apikey:someone-else\"]\nenterprise = true\nfull_tokens = true\n";
const FOR_ANONYMOUS: &str =
    "[[rules]]\nname = \"anon\"\ncallers = [\"anonymous\"]\nenterprise = true\nfull_tokens = true\n";

async fn reloadable() -> (Harness, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, FOR_SOMEONE_ELSE).unwrap();
    let h = Harness::with(Options {
        policy: Some(Policy::load(&path).unwrap()),
        ..Options::default()
    })
    .await;
    (h, dir, path)
}

#[tokio::test]
async fn a_valid_policy_change_takes_effect_without_restart() {
    use box_token_broker::reload::{PolicyWatcher, ReloadOutcome};
    let (h, _dir, path) = reloadable().await;
    let mut watcher = PolicyWatcher::new(path.clone(), h.broker.clone());
    assert_eq!(h.get(enterprise()).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(watcher.check(false), ReloadOutcome::Unchanged);
    std::fs::write(&path, FOR_ANONYMOUS).unwrap();
    assert_eq!(watcher.check(false), ReloadOutcome::Reloaded);
    h.get(enterprise()).await.unwrap();
}

#[tokio::test]
async fn an_invalid_policy_change_is_rejected_and_the_old_policy_stays() {
    use box_token_broker::reload::{PolicyWatcher, ReloadOutcome};
    let (h, _dir, path) = reloadable().await;
    let mut watcher = PolicyWatcher::new(path.clone(), h.broker.clone());
    std::fs::write(&path, FOR_ANONYMOUS).unwrap();
    assert_eq!(watcher.check(false), ReloadOutcome::Reloaded);
    std::fs::write(
        &path,
        "[[rules]]\nname = \"broken\"\ncallers = [\"anonymous\"]\nenterprise = true\nscopes = [\"item_everything\"]\n",
    )
    .unwrap();
    let ReloadOutcome::Rejected(why) = watcher.check(false) else {
        panic!("an invalid policy is rejected")
    };
    assert!(
        why.contains("\"item_everything\" is not a Box downscope scope"),
        "{why}"
    );
    h.get(enterprise()).await.unwrap();
    assert_eq!(h.broker.policy().rules[0].name.as_ref(), "anon");
    // Deleting the file does not drop the policy either.
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(watcher.check(true), ReloadOutcome::Rejected(_)));
    h.get(enterprise()).await.unwrap();
}

#[tokio::test]
async fn the_watcher_notices_a_changed_file_by_itself() {
    use box_token_broker::reload::PolicyWatcher;
    let (h, _dir, path) = reloadable().await;
    let watcher = tokio::spawn(
        PolicyWatcher::new(path.clone(), h.broker.clone()).run(std::time::Duration::from_millis(20), None),
    );
    std::fs::write(&path, FOR_ANONYMOUS).unwrap();
    let changed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while h.broker.policy().rules[0].name.as_ref() != "anon" {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    watcher.abort();
    assert!(changed.is_ok(), "the new policy was picked up");
    h.get(enterprise()).await.unwrap();
}

#[tokio::test]
async fn a_rule_s_max_lifetime_caps_expires_at_and_refuses_longer_min_ttl() {
    let policy = Policy::parse(
        "[[rules]]\nname = \"short-lived\"\ncallers = [\"anonymous\"]\nenterprise = true\nfull_tokens = true\nmax_lifetime_secs = 600\n",
        "test policy",
    )
    .unwrap();
    let h = Harness::with(Options {
        policy: Some(policy),
        ..Options::default()
    })
    .await;
    let now = || box_token_broker::clock::unix_seconds(box_token_broker::clock::Clock::now(&*h.clock));
    let before = now();
    let served = h.get(enterprise()).await.unwrap();
    let after = now();
    // Box's token lives about an hour; the caller is told ten minutes (from
    // the moment of the grant, which the clock's real-time drift brackets).
    let expires = served.token.as_ref().unwrap().expires_at.unwrap().seconds;
    assert!(
        (before + 600..=after + 600).contains(&expires),
        "{expires} vs {before}+600"
    );

    let mut long = enterprise();
    long.min_ttl = common::secs(601);
    let denied = h.get(long).await.unwrap_err();
    assert_status(
        &denied,
        Code::PermissionDenied,
        "min_ttl of 601 s exceeds the longest lifetime allowed, 600 s (rule \"short-lived\")",
    );
    let mut within = enterprise();
    within.min_ttl = common::secs(600);
    assert!(h.get(within).await.is_ok());
    let events = h.audit_events();
    assert!(
        events
            .iter()
            .any(|e| e["decision"] == "deny" && e["reason"].as_str().is_some_and(|r| r.contains("min_ttl of 601 s"))),
        "{events:?}"
    );
}

#[test]
fn a_max_lifetime_of_zero_or_past_a_day_is_an_invalid_policy() {
    // i64::MAX once passed validation and then panicked every request under
    // the rule, unaudited.
    for secs in ["0", "86401", "9223372036854775807"] {
        let text = format!(
            "[[rules]]\nname = \"r\"\ncallers = [\"apikey:x\"]\nenterprise = true\nmax_lifetime_secs = {secs}\n"
        );
        let e = Policy::parse(&text, "p.toml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("max_lifetime_secs must be 1 to 86400"), "{secs}: {e}");
    }
}
