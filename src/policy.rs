//! Who may get what: a deny-by-default policy, pure code without I/O.
//!
//! A policy is a list of rules. A rule matches caller identities (exact or
//! `*`-glob) and grants apps, subjects, whether full (un-downscoped) tokens
//! may be returned, the largest scope set for downscoped tokens, and the
//! targets those may name. A request is allowed when some rule matching the
//! caller grants all of it; otherwise it is denied, and the reason names the
//! first offending item — nothing is ever silently trimmed.

use std::{collections::BTreeSet, fmt, path::Path, time::Duration};

use serde::Deserialize;

use crate::boxapi::{Target, downscope::DOWNSCOPE_SCOPES};

/// A `*`/`?` glob (`*` any run of characters, `?` one character); without
/// wildcards, an exact match.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Glob(String);

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Glob {
    /// A glob from its text.
    pub fn new(pattern: &str) -> Self {
        Self(pattern.to_owned())
    }

    /// True when `text` matches.
    pub fn matches(&self, text: &str) -> bool {
        glob_match(self.0.as_bytes(), text.as_bytes())
    }

    /// As a caller pattern: refused when it cannot match any caller
    /// identity, which always names its mechanism (`apikey:…`, `dns:…`,
    /// `spiffe://…`, `uri:…`, `system:serviceaccount:…`, `uds:…`) or is
    /// `anonymous`. A bare name such as `customer-portal` matched an API key
    /// before identities carried their mechanism; it matches nothing now.
    pub fn check_caller(&self) -> Result<(), String> {
        let p = &self.0;
        if p == "anonymous"
            || CALLER_MECHANISMS.iter().any(|m| p.starts_with(m))
            || (!p.is_empty() && p.bytes().all(|b| b == b'*'))
        {
            return Ok(());
        }
        let hint = match p.split_once(':') {
            // `*:portal` and the like would match several mechanisms at once.
            Some((scheme, _)) if scheme.contains(['*', '?']) => format!(
                "a pattern may not span mechanisms: name one, e.g. \"apikey:{}\"",
                p.split_once(':').map_or("", |(_, rest)| rest)
            ),
            Some(_) => "its mechanism is none the broker knows".to_owned(),
            None => format!("it names no mechanism (e.g. \"apikey:{p}\")"),
        };
        Err(format!(
            "caller {p:?} matches no caller: {hint}; identities are apikey:NAME, dns:NAME, spiffe://..., \
             uri:URI, system:serviceaccount:NAMESPACE:NAME, uds:NAME or anonymous"
        ))
    }
}

fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative wildcard matching with backtracking to the last `*`.
    let (mut p, mut t) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some(p);
            mark = t;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// One rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A name for audit records and denial messages (shared, not copied, per request).
    pub name: std::sync::Arc<str>,
    /// Caller identities this rule applies to.
    pub callers: Vec<Glob>,
    /// Apps it grants (by config name).
    #[serde(default = "all")]
    pub apps: Vec<Glob>,
    /// May get the app's Service Account (enterprise) tokens.
    #[serde(default)]
    pub enterprise: bool,
    /// User ids it may get tokens for.
    #[serde(default)]
    pub users: Vec<Glob>,
    /// External ids (`external_app_user_id`, e.g. `"auth0|*"`) of users it
    /// may get tokens for, asked by external id; decided before any call to Box.
    #[serde(default)]
    pub external_users: Vec<Glob>,
    /// May ask to create the App User of an external id it is granted when
    /// Box has none (`create_if_missing`).
    #[serde(default)]
    pub provision: bool,
    /// May get full (un-downscoped) tokens through `GetToken`.
    #[serde(default)]
    pub full_tokens: bool,
    /// The largest scope set a downscoped token may have.
    #[serde(default)]
    pub scopes: BTreeSet<String>,
    /// File ids downscoped tokens may be restricted to.
    #[serde(default)]
    pub files: Vec<Glob>,
    /// Folder ids downscoped tokens may be restricted to.
    #[serde(default)]
    pub folders: Vec<Glob>,
    /// May downscope to a shared link's item.
    #[serde(default)]
    pub shared_links: bool,
    /// May get downscoped tokens with no target (restricted by scope only).
    #[serde(default)]
    pub untargeted: bool,
    /// May revoke (`RevokeToken`) the tokens of its subjects that were
    /// served to the caller alone.
    #[serde(default)]
    pub revoke: bool,
    /// May ask for `force_refresh` (a new mint instead of the cached token;
    /// at most one per key per `[cache] force_refresh_interval_secs`).
    #[serde(default)]
    pub force_refresh: bool,
    /// The longest a token served under this rule may be held, in seconds.
    /// Box tokens cannot be shortened, so this is enforced in two ways: a
    /// request whose `min_ttl` exceeds it is denied, and the `expires_at` the
    /// caller is told is at most this far ahead, so a caller that refreshes at
    /// `expires_at` comes back within it. (Box still accepts the token until
    /// its own expiry; revoke it for a hard stop.)
    #[serde(default, deserialize_with = "crate::duration::de_secs_opt")]
    pub max_lifetime_secs: Option<u64>,
}

fn all() -> Vec<Glob> {
    vec![Glob("*".to_owned())]
}

/// The whole policy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The rules, tried in order.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// The prefixes caller identities carry, one per mechanism (see `auth`).
pub const CALLER_MECHANISMS: &[&str] = &["apikey:", "dns:", "spiffe://", "uri:", "system:serviceaccount:", "uds:"];

/// The largest `max_lifetime_secs` a rule may set: a day (Box tokens live
/// about an hour, so a larger bound could never bind).
pub const MAX_LIFETIME_SECS: u64 = 86_400;

/// Whose token, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicySubject<'a> {
    /// The Service Account.
    Enterprise,
    /// A user, by id.
    User(&'a str),
    /// A user by external id; `provision` when the request may create it.
    ExternalUser {
        /// The `external_app_user_id`.
        id: &'a str,
        /// The request asks to create the App User if Box has none.
        provision: bool,
    },
}

impl fmt::Display for PolicySubject<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Enterprise => f.write_str("the Service Account (enterprise)"),
            Self::User(id) => write!(f, "user {id}"),
            Self::ExternalUser { id, .. } => write!(f, "external user {id:?}"),
        }
    }
}

/// What is asked for.
#[derive(Debug, Clone, Copy)]
pub enum Ask<'a> {
    /// A full token (`GetToken`).
    Full,
    /// A downscoped token.
    Downscoped {
        /// Normalized scopes.
        scopes: &'a [String],
        /// The target, if any.
        target: Option<&'a Target>,
    },
    /// Revoking one of the subject's tokens.
    Revoke,
}

/// A request, as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The caller's identity.
    pub caller: &'a str,
    /// The resolved app name.
    pub app: &'a str,
    /// Whose token.
    pub subject: PolicySubject<'a>,
    /// What kind of token.
    pub ask: Ask<'a>,
    /// The remaining life the caller needs (zero for revocation).
    pub min_ttl: Duration,
    /// The caller asks for a new mint instead of the cached token.
    pub force_refresh: bool,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by the named rule.
    Allow {
        /// The rule's name.
        rule: String,
    },
    /// Denied; the reason names the first offending item.
    Deny {
        /// What is not allowed, for the caller and the audit record.
        reason: String,
    },
}

/// Why a policy file is invalid.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {problem}")]
pub struct PolicyError {
    /// The file.
    pub source_name: String,
    /// What is wrong.
    pub problem: String,
}

impl Policy {
    /// A policy with one rule granting everything to callers matching
    /// `caller` — for `dev` mode and tests, never a default.
    pub fn allow_everything(caller: &str) -> Self {
        let all = || vec![Glob("*".to_owned())];
        Self {
            rules: vec![Rule {
                name: "allow everything (development)".into(),
                callers: vec![Glob(caller.to_owned())],
                apps: all(),
                enterprise: true,
                users: all(),
                external_users: all(),
                provision: true,
                full_tokens: true,
                scopes: DOWNSCOPE_SCOPES.iter().map(|s| (*s).to_owned()).collect(),
                files: all(),
                folders: all(),
                shared_links: true,
                untargeted: true,
                revoke: true,
                force_refresh: true,
                max_lifetime_secs: None,
            }],
        }
    }

    /// Parses and validates a policy from TOML text; `source_name` names it in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, PolicyError> {
        let error = |problem: String| PolicyError {
            source_name: source_name.to_owned(),
            problem,
        };
        let policy: Self = toml::from_str(text).map_err(|e| error(e.message().trim().replace('\n', " ")))?;
        policy.validate().map_err(error)?;
        Ok(policy)
    }

    /// Reads, parses and validates a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            source_name: name.clone(),
            problem: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, &name)
    }

    fn validate(&self) -> Result<(), String> {
        let mut names = BTreeSet::new();
        for rule in &self.rules {
            let name = &rule.name;
            if name.is_empty() || !names.insert(&**name) {
                return Err(format!("every rule needs a unique, non-empty name (problem: {name:?})"));
            }
            if rule.callers.is_empty() {
                return Err(format!(
                    "rule {name:?}: callers is empty; name at least one caller identity"
                ));
            }
            if let Some(bad) = rule.scopes.iter().find(|s| !DOWNSCOPE_SCOPES.contains(&s.as_str())) {
                return Err(format!("rule {name:?}: {bad:?} is not a Box downscope scope"));
            }
            let targeted = !rule.files.is_empty() || !rule.folders.is_empty() || rule.shared_links || rule.untargeted;
            if targeted && rule.scopes.is_empty() {
                return Err(format!(
                    "rule {name:?}: targets are granted but no scopes; add scopes = [...]"
                ));
            }
            if let Some(bad) = rule.callers.iter().find_map(|c| c.check_caller().err()) {
                return Err(format!("rule {name:?}: {bad}"));
            }
            if rule.max_lifetime_secs.is_some_and(|s| s == 0 || s > MAX_LIFETIME_SECS) {
                return Err(format!(
                    "rule {name:?}: max_lifetime_secs must be 1 to {MAX_LIFETIME_SECS} (Box tokens live about an hour; leave it out for no limit)"
                ));
            }
            if !rule.enterprise && rule.users.is_empty() && rule.external_users.is_empty() {
                return Err(format!(
                    "rule {name:?}: grants no subject; set enterprise = true, users = [...] or external_users = [...]"
                ));
            }
            if rule.provision && rule.external_users.is_empty() {
                return Err(format!(
                    "rule {name:?}: provision = true needs external_users = [...]: App Users are created for the external ids a rule grants"
                ));
            }
        }
        Ok(())
    }

    /// Decides `request`. Deny by default.
    pub fn decide(&self, request: &Request<'_>) -> Decision {
        match self.granting_rule(request) {
            Ok(rule) => Decision::Allow {
                rule: rule.name.to_string(),
            },
            Err(reason) => Decision::Deny { reason },
        }
    }

    /// May `caller` revoke any token of `app` (some rule grants `revoke`)?
    /// Asked before a token is looked up, so a caller without the grant
    /// learns nothing about which tokens exist.
    pub fn may_revoke(&self, caller: &str, app: &str) -> bool {
        self.rules
            .iter()
            .any(|r| r.revoke && r.callers.iter().any(|c| c.matches(caller)) && r.apps.iter().any(|a| a.matches(app)))
    }

    /// Of `apps`, those some rule lets `caller` use (for telling a caller
    /// which app names it may give, and no others).
    pub fn apps_for<'a>(&self, caller: &str, apps: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let rules: Vec<&Rule> = self
            .rules
            .iter()
            .filter(|r| r.callers.iter().any(|c| c.matches(caller)))
            .collect();
        apps.into_iter()
            .filter(|app| rules.iter().any(|r| r.apps.iter().any(|a| a.matches(app))))
            .map(str::to_owned)
            .collect()
    }

    /// The first rule that grants `request`, or why none does (the first
    /// offending item, naming its rule).
    pub fn granting_rule(&self, request: &Request<'_>) -> Result<&Rule, String> {
        let mut first_reason = None;
        for rule in self
            .rules
            .iter()
            .filter(|r| r.callers.iter().any(|c| c.matches(request.caller)))
        {
            match rule.check(request) {
                Ok(()) => return Ok(rule),
                Err(reason) => {
                    first_reason.get_or_insert_with(|| format!("{reason} (rule {:?})", rule.name));
                }
            }
        }
        Err(first_reason.unwrap_or_else(|| format!("no policy rule grants anything to caller {:?}", request.caller)))
    }
}

impl Rule {
    /// `max_lifetime_secs` as a duration.
    pub fn max_lifetime(&self) -> Option<Duration> {
        self.max_lifetime_secs.map(Duration::from_secs)
    }

    fn check(&self, request: &Request<'_>) -> Result<(), String> {
        if !self.apps.iter().any(|a| a.matches(request.app)) {
            return Err(format!("app {:?} is not allowed", request.app));
        }
        let subject_ok = match request.subject {
            PolicySubject::Enterprise => self.enterprise,
            PolicySubject::User(id) => self.users.iter().any(|u| u.matches(id)),
            PolicySubject::ExternalUser { id, .. } => self.external_users.iter().any(|u| u.matches(id)),
        };
        if !subject_ok {
            return Err(format!("{} is not allowed", request.subject));
        }
        if matches!(request.subject, PolicySubject::ExternalUser { provision: true, .. }) && !self.provision {
            return Err(
                "creating App Users (create_if_missing) is not allowed (the rule does not set provision = true)"
                    .to_owned(),
            );
        }
        if request.force_refresh && !self.force_refresh {
            return Err("force_refresh is not allowed (the rule does not set force_refresh = true)".to_owned());
        }
        if let Some(max) = self.max_lifetime()
            && request.min_ttl > max
        {
            return Err(format!(
                "min_ttl of {} s exceeds the longest lifetime allowed, {} s",
                request.min_ttl.as_secs_f64().ceil(),
                max.as_secs()
            ));
        }
        match request.ask {
            Ask::Revoke if self.revoke => Ok(()),
            Ask::Revoke => Err("revoking tokens is not allowed (the rule does not set revoke = true)".to_owned()),
            Ask::Full if self.full_tokens => Ok(()),
            Ask::Full => Err("full (un-downscoped) tokens are not allowed; ask for a downscoped token".to_owned()),
            Ask::Downscoped { scopes, target } => {
                if let Some(scope) = scopes.iter().find(|s| !self.scopes.contains(*s)) {
                    return Err(format!("scope {scope:?} is not allowed"));
                }
                let target_ok = match target {
                    None => self.untargeted,
                    Some(Target::File(id)) => self.files.iter().any(|g| g.matches(id.as_str())),
                    Some(Target::Folder(id)) => self.folders.iter().any(|g| g.matches(id.as_str())),
                    Some(Target::SharedLink(_)) => self.shared_links,
                };
                match (target_ok, target) {
                    (true, _) => Ok(()),
                    (false, None) => {
                        Err("a downscoped token without a target is not allowed; name a file or folder".to_owned())
                    }
                    (false, Some(t)) => Err(format!("{t} is not an allowed target")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_expected() {
        let g = |p: &str| Glob(p.to_owned());
        assert!(g("*").matches(""));
        assert!(g("apikey:portal-*").matches("apikey:portal-web"));
        assert!(!g("apikey:portal-*").matches("apikey:admin"));
        assert!(g("72000?").matches("720001"));
        assert!(!g("72000?").matches("7200011"));
        assert!(g("a*b*c").matches("aXXbYYc"));
        assert!(!g("a*b*c").matches("aXXbYY"));
        assert!(g("exact").matches("exact") && !g("exact").matches("exactly"));
    }

    const POLICY: &str = r#"
        [[rules]]
        name = "portal"
        callers = ["apikey:portal-*"]
        users = ["72000*"]
        scopes = ["item_preview", "item_download"]
        folders = ["7500002"]
    "#;

    fn request<'a>(caller: &'a str, subject: PolicySubject<'a>, ask: Ask<'a>) -> Request<'a> {
        Request {
            caller,
            app: "default",
            subject,
            ask,
            min_ttl: Duration::ZERO,
            force_refresh: false,
        }
    }

    #[test]
    fn external_ids_are_granted_by_their_own_globs_and_creation_only_with_provision() {
        let text = |provision: bool| {
            format!(
                "[[rules]]\nname = \"portal\"\ncallers = [\"apikey:portal\"]\nexternal_users = [\"auth0|*\"]\nprovision = {provision}\nfull_tokens = true\n"
            )
        };
        let policy = Policy::parse(&text(false), "p.toml").unwrap_or_default();
        let ask = |policy: &Policy, id, provision| {
            policy.decide(&request(
                "apikey:portal",
                PolicySubject::ExternalUser { id, provision },
                Ask::Full,
            ))
        };
        assert!(matches!(ask(&policy, "auth0|ada", false), Decision::Allow { .. }));
        assert!(
            matches!(ask(&policy, "tenant-a/ada", false), Decision::Deny { reason } if reason.contains("external user \"tenant-a/ada\" is not allowed"))
        );
        assert!(
            matches!(ask(&policy, "auth0|ada", true), Decision::Deny { reason } if reason.contains("provision = true"))
        );
        let provisioning = Policy::parse(&text(true), "p.toml").unwrap_or_default();
        assert!(matches!(ask(&provisioning, "auth0|new", true), Decision::Allow { .. }));
        // External-id grants say nothing of Box user ids.
        let by_id = provisioning.decide(&request("apikey:portal", PolicySubject::User("7200001"), Ask::Full));
        assert!(matches!(by_id, Decision::Deny { .. }));
    }

    #[test]
    fn provision_needs_external_users() {
        let e = Policy::parse(
            "[[rules]]\nname = \"x\"\ncallers = [\"apikey:a\"]\nusers = [\"*\"]\nprovision = true\n",
            "p.toml",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("provision = true needs external_users"), "{e}");
        let only_external = Policy::parse(
            "[[rules]]\nname = \"x\"\ncallers = [\"apikey:a\"]\nexternal_users = [\"*\"]\n",
            "p.toml",
        );
        assert!(only_external.is_ok(), "external_users alone is a subject");
    }

    #[test]
    fn deny_by_default() {
        let policy = Policy::default();
        let d = policy.decide(&request("anyone", PolicySubject::Enterprise, Ask::Full));
        assert!(
            matches!(d, Decision::Deny { reason } if reason.contains("no policy rule grants anything to caller \"anyone\""))
        );
    }

    #[test]
    fn the_first_offending_item_is_named() {
        let policy = Policy::parse(POLICY, "p.toml").unwrap_or_default();
        let scopes = vec!["item_delete".to_owned()];
        let folder = Target::Folder(crate::boxapi::BoxId::parse("7500002").unwrap_or_else(|_| unreachable!()));
        let deny = |ask| match policy.decide(&request("apikey:portal-web", PolicySubject::User("7200001"), ask)) {
            Decision::Deny { reason } => reason,
            Decision::Allow { .. } => String::new(),
        };
        assert!(deny(Ask::Full).starts_with("full (un-downscoped) tokens are not allowed"));
        assert!(
            deny(Ask::Downscoped {
                scopes: &scopes,
                target: Some(&folder)
            })
            .starts_with("scope \"item_delete\" is not allowed")
        );
        let ok = vec!["item_preview".to_owned()];
        assert!(
            deny(Ask::Downscoped {
                scopes: &ok,
                target: None
            })
            .contains("without a target")
        );
        assert_eq!(
            policy.decide(&request(
                "apikey:portal-web",
                PolicySubject::User("7200001"),
                Ask::Downscoped {
                    scopes: &ok,
                    target: Some(&folder)
                }
            )),
            Decision::Allow {
                rule: "portal".to_owned()
            }
        );
    }

    #[test]
    fn invalid_policies_are_refused_with_the_rule_named() {
        let unknown_scope =
            "[[rules]]\nname = \"r\"\ncallers = [\"apikey:x\"]\nenterprise = true\nscopes = [\"item_everything\"]\n";
        let e = Policy::parse(unknown_scope, "p.toml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("p.toml: rule \"r\": \"item_everything\" is not a Box downscope scope"),
            "{e}"
        );
        let no_subject = "[[rules]]\nname = \"r\"\ncallers = [\"apikey:x\"]\nfull_tokens = true\n";
        assert!(Policy::parse(no_subject, "p").is_err());
        let dup = "[[rules]]\nname = \"r\"\ncallers = [\"apikey:x\"]\nenterprise = true\n[[rules]]\nname = \"r\"\ncallers = [\"apikey:y\"]\nenterprise = true\n";
        assert!(Policy::parse(dup, "p").is_err());
        let typo = "[[rules]]\nname = \"r\"\ncallers = [\"apikey:x\"]\nenterprise = true\nfull_token = true\n";
        assert!(
            Policy::parse(typo, "p")
                .err()
                .is_some_and(|e| e.to_string().contains("unknown field `full_token`"))
        );
    }

    #[test]
    fn a_caller_pattern_without_a_mechanism_is_refused_with_the_fix() {
        let bare = "[[rules]]\nname = \"r\"\ncallers = [\"customer-portal\"]\nenterprise = true\n";
        let e = Policy::parse(bare, "p.toml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("caller \"customer-portal\" matches no caller: it names no mechanism"),
            "{e}"
        );
        assert!(e.contains("\"apikey:customer-portal\""), "{e}");
        for fine in [
            "*",
            "anonymous",
            "apikey:*",
            "dns:billing.internal",
            "system:serviceaccount:ns:*",
        ] {
            let text = format!("[[rules]]\nname = \"r\"\ncallers = [\"{fine}\"]\nenterprise = true\n");
            assert!(Policy::parse(&text, "p").is_ok(), "{fine}");
        }
    }

    #[test]
    fn numbers_that_cannot_bind_are_refused_at_load() {
        for bad in ["0", "86401", "9223372036854775807"] {
            let text =
                format!("[[rules]]\nname = \"r\"\ncallers = [\"*\"]\nenterprise = true\nmax_lifetime_secs = {bad}\n");
            let e = Policy::parse(&text, "p")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("max_lifetime_secs must be 1 to 86400"), "{bad}: {e}");
        }
    }

    #[test]
    fn revoking_and_forcing_a_refresh_are_grants_of_their_own() {
        let policy = Policy::parse(
            "[[rules]]\nname = \"plain\"\ncallers = [\"apikey:a\"]\nenterprise = true\nfull_tokens = true\n\
             [[rules]]\nname = \"revoker\"\ncallers = [\"apikey:b\"]\nenterprise = true\nfull_tokens = true\nrevoke = true\nforce_refresh = true\n",
            "p",
        )
        .unwrap_or_default();
        assert!(!policy.may_revoke("apikey:a", "default"));
        assert!(policy.may_revoke("apikey:b", "default"));
        let revoke = |caller| policy.decide(&request(caller, PolicySubject::Enterprise, Ask::Revoke));
        assert!(matches!(revoke("apikey:a"), Decision::Deny { reason } if reason.contains("revoke = true")));
        assert!(matches!(revoke("apikey:b"), Decision::Allow { .. }));
        let forced = |caller| {
            policy.decide(&Request {
                force_refresh: true,
                ..request(caller, PolicySubject::Enterprise, Ask::Full)
            })
        };
        assert!(
            matches!(forced("apikey:a"), Decision::Deny { reason } if reason.contains("force_refresh is not allowed"))
        );
        assert!(matches!(forced("apikey:b"), Decision::Allow { .. }));
    }
}
