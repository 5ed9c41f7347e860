//! Downscoping vocabulary (box-contract.md §5): the scopes Box's token
//! exchange accepts, the one item a token can be restricted to, and Box's
//! `restricted_to` entries.

use std::fmt;

use super::BoxId;

/// Every scope Box documents for downscoping: the UI-element scopes (D11, the
/// OpenAPI enum, the UI-element guides — their union) and the standard OAuth
/// scopes D11 allows when downscoping.
pub const DOWNSCOPE_SCOPES: &[&str] = &[
    "ai.readwrite",
    "annotation_edit",
    "annotation_view_all",
    "annotation_view_self",
    "base_explorer",
    "base_picker",
    "base_preview",
    "base_sidebar",
    "base_upload",
    "item_comment",
    "item_delete",
    "item_download",
    "item_preview",
    "item_read",
    "item_readwrite",
    "item_rename",
    "item_share",
    "item_task",
    "item_upload",
    "manage_app_users",
    "manage_data_retention",
    "manage_enterprise_properties",
    "manage_groups",
    "manage_managed_users",
    "manage_webhook",
    "root_readonly",
    "root_readwrite",
    "sign_requests.readwrite",
];

/// The resource URLs Box's token exchange takes name this host, whatever
/// host the request itself goes to.
const RESOURCE_BASE: &str = "https://api.box.com/2.0";

/// Why a scope list is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// No scopes.
    #[error("scopes is empty: name at least one Box downscope scope, e.g. item_preview")]
    Empty,
    /// Not a Box downscope scope.
    #[error("scope {0:?} is not a Box downscope scope (e.g. item_preview, item_download, base_explorer)")]
    Unknown(String),
}

/// Sorts and de-duplicates `scopes`, refusing any Box does not document.
pub fn normalize_scopes(scopes: &[String]) -> Result<Vec<String>, ScopeError> {
    if scopes.is_empty() {
        return Err(ScopeError::Empty);
    }
    if let Some(unknown) = scopes.iter().find(|s| !DOWNSCOPE_SCOPES.contains(&s.as_str())) {
        return Err(ScopeError::Unknown(
            unknown.chars().filter(|c| !c.is_control()).take(64).collect(),
        ));
    }
    let mut normalized = scopes.to_vec();
    normalized.sort();
    normalized.dedup();
    Ok(normalized)
}

/// The one item a downscoped token is restricted to. Its `Debug` shows a
/// shared link only by fingerprint: the link can itself be a capability.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A file.
    File(BoxId),
    /// A folder.
    Folder(BoxId),
    /// The item behind a shared link.
    SharedLink(String),
}

/// What a downscoped token is restricted to: normalized (sorted, de-duplicated)
/// scopes and an optional target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Downscope {
    /// Sorted, de-duplicated scopes.
    pub scopes: Vec<String>,
    /// The one item, if any.
    pub target: Option<Target>,
}

/// Why a shared link is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shared_link must be an https:// Box shared link such as https://app.box.com/s/abc123")]
pub struct SharedLinkError;

/// How a shared link is shown in audit records and `Debug` output: the first
/// 8 bytes of its SHA-256 (enough to correlate; the link itself can be a
/// capability).
pub fn link_fingerprint(url: &str) -> [u8; 8] {
    let digest = crate::fingerprint::digest(url);
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&digest[..8]);
    prefix
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(id) => f.debug_tuple("File").field(id).finish(),
            Self::Folder(id) => f.debug_tuple("Folder").field(id).finish(),
            Self::SharedLink(url) => write!(f, "SharedLink(sha256:{})", hex::encode(link_fingerprint(url))),
        }
    }
}

impl Target {
    /// Checks a shared link: https, a box.com host (parsed as a URL, so
    /// `https://evil.example?.box.com/` or `https://box.com@evil.example/`
    /// are not), no credentials or other port, no whitespace, sane length.
    pub fn shared_link(url: &str) -> Result<Self, SharedLinkError> {
        if url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(SharedLinkError);
        }
        let parsed = reqwest::Url::parse(url).map_err(|_| SharedLinkError)?;
        let host = parsed.host_str().unwrap_or_default().to_ascii_lowercase();
        let box_host = host == "box.com" || host.ends_with(".box.com");
        if parsed.scheme() != "https"
            || !box_host
            || !parsed.username().is_empty()
            || parsed.password().is_some()
            || parsed.port().is_some()
        {
            return Err(SharedLinkError);
        }
        Ok(Self::SharedLink(url.to_owned()))
    }

    /// The token-exchange form field and value for this target.
    pub fn form_field(&self) -> (&'static str, String) {
        match self {
            Self::File(id) => ("resource", format!("{RESOURCE_BASE}/files/{id}")),
            Self::Folder(id) => ("resource", format!("{RESOURCE_BASE}/folders/{id}")),
            Self::SharedLink(url) => ("box_shared_link", url.clone()),
        }
    }

    /// True when Box's `restricted_to` entry names this target. A shared
    /// link's item id is not known in advance, so any file or folder counts.
    pub fn is_named_by(&self, restriction: &Restriction) -> bool {
        match self {
            Self::File(id) => restriction.object_type == "file" && restriction.object_id == id.as_str(),
            Self::Folder(id) => restriction.object_type == "folder" && restriction.object_id == id.as_str(),
            Self::SharedLink(_) => matches!(restriction.object_type.as_str(), "file" | "folder"),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(id) => write!(f, "file {id}"),
            Self::Folder(id) => write!(f, "folder {id}"),
            Self::SharedLink(_) => f.write_str("the shared link's item"),
        }
    }
}

/// One `restricted_to` entry of a downscoped token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restriction {
    /// The scope.
    pub scope: String,
    /// `file` or `folder`.
    pub object_type: String,
    /// The item id.
    pub object_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn scopes_are_sorted_and_deduplicated() {
        let n = normalize_scopes(&strings(&["item_upload", "item_preview", "item_upload"]));
        assert_eq!(n, Ok(strings(&["item_preview", "item_upload"])));
    }

    #[test]
    fn unknown_and_empty_scopes_are_refused() {
        assert_eq!(normalize_scopes(&[]), Err(ScopeError::Empty));
        assert_eq!(
            normalize_scopes(&strings(&["item_preview", "admin_everything"])),
            Err(ScopeError::Unknown("admin_everything".to_owned()))
        );
    }

    #[test]
    fn shared_links_must_be_https_box_links() {
        assert!(Target::shared_link("https://app.box.com/s/abc").is_ok());
        assert!(Target::shared_link("https://acme.app.box.com/s/abc").is_ok());
        assert!(Target::shared_link("http://app.box.com/s/abc").is_err());
        assert!(Target::shared_link("https://evil.com/app.box.com/s/x").is_err());
        assert!(Target::shared_link("https://notbox.com/s/x").is_err());
    }

    #[test]
    fn a_shared_link_whose_host_only_looks_like_box_is_refused() {
        for evil in [
            "https://evil.example?.box.com/s/x",
            "https://evil.example#.box.com/s/x",
            "https://app.box.com@evil.example/s/x",
            "https://user:pw@app.box.com/s/x",
            "https://app.box.com:8443/s/x",
            "https://evil.example\\.box.com/s/x",
            "https://app.box.com.evil.example/s/x",
        ] {
            assert!(Target::shared_link(evil).is_err(), "{evil}");
        }
        assert!(Target::shared_link("https://app.box.com/s/abc?x=1#frag").is_ok());
    }
}
