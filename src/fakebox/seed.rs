//! A ready-made Box enterprise for dev mode and tests: one app (with both
//! users-API scopes, `manage_app_users` and `manage_managed_users`), its
//! Service Account, three App Users (external ids `auth0|ada`, `auth0|bob`,
//! `auth0|cy`), a Managed User, an admin, a co-admin and an inactive Managed
//! User, an external user, and an App User that belongs to a different app.
//! Every user is `active` with role `user` unless its name says otherwise.
//! The ids are fixed so docs can name them. The token endpoint mints for
//! every one of them (admins and inactive users too): refusing those is the
//! broker's job.

use std::{collections::BTreeMap, fmt};

use rsa::RsaPrivateKey;
use secrecy::{ExposeSecret as _, SecretString};

use super::{
    FakeApp, FakeAuth, FakeBox, FakeItem, FakeUser, MANAGE_APP_USERS, MANAGE_MANAGED_USERS, UserKind,
    state::random_lower,
};
use crate::boxapi::private_key::{KeyEncryption, KeyError, encrypt_private_key};

/// The enterprise.
pub const ENTERPRISE_ID: &str = "7000001";
/// The app's Service Account.
pub const SERVICE_ACCOUNT_ID: &str = "7100001";
/// App Users of the seeded app.
pub const APP_USER_IDS: [&str; 3] = ["7200001", "7200002", "7200003"];
/// The `external_app_user_id`s of [`APP_USER_IDS`], in the same order.
pub const APP_USER_EXTERNAL_IDS: [&str; 3] = ["auth0|ada", "auth0|bob", "auth0|cy"];
/// A Managed User (needs "App + Enterprise Access").
pub const MANAGED_USER_ID: &str = "7300001";
/// A Managed User with role `admin` ("Alex Admin").
pub const ADMIN_USER_ID: &str = "7300002";
/// A Managed User with role `coadmin` ("Cora Coadmin").
pub const COADMIN_USER_ID: &str = "7300003";
/// A Managed User with status `inactive` ("Ivan Inactive").
pub const INACTIVE_USER_ID: &str = "7300004";
/// An external user: never tokenizable.
pub const EXTERNAL_USER_ID: &str = "7400001";
/// An App User created by some other app: not tokenizable by this one.
pub const OTHER_APP_USER_ID: &str = "7200999";
/// A folder the Service Account owns (a Service-Account-model portal's root).
pub const SERVICE_ACCOUNT_FOLDER_ID: &str = "7500001";
/// A file in that folder, with a public shared link.
pub const SERVICE_ACCOUNT_FILE_ID: &str = "7600001";
/// The shared link of [`SERVICE_ACCOUNT_FILE_ID`].
pub const SHARED_LINK: &str = "https://app.box.com/s/fakesharedlink0001";
/// A folder the first App User owns.
pub const APP_USER_FOLDER_ID: &str = "7500002";
/// A file the first App User owns.
pub const APP_USER_FILE_ID: &str = "7600002";

/// The seeded app's credentials, as the developer console would show them.
#[derive(Clone)]
pub struct SeededApp {
    /// Client id (32 lowercase alphanumerics, like Box's).
    pub client_id: String,
    /// Client secret.
    pub client_secret: SecretString,
    /// The `kid` of the registered public key (JWT apps).
    pub kid: String,
}

impl fmt::Debug for SeededApp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeededApp")
            .field("client_id", &self.client_id)
            .field("client_secret", &"****")
            .field("kid", &self.kid)
            .finish()
    }
}

/// Registers the seeded enterprise and an authorized app with user tokens and
/// enterprise access on. A JWT app gets `key`'s public half registered.
pub fn seed(fake: &FakeBox, auth: FakeAuth, key: Option<&RsaPrivateKey>) -> SeededApp {
    let client_id = random_lower(32);
    let client_secret = random_lower(32);
    let kid = random_lower(8);
    let mut keys = BTreeMap::new();
    if let Some(key) = key {
        keys.insert(kid.clone(), key.to_public_key());
    }
    fake.add_app(FakeApp {
        client_id: client_id.clone(),
        client_secret: client_secret.clone(),
        enterprise_id: ENTERPRISE_ID.to_owned(),
        auth,
        keys,
        authorized: true,
        user_tokens: true,
        enterprise_access: true,
        service_account_id: SERVICE_ACCOUNT_ID.to_owned(),
        // Read/write on all content: every downscope scope is a subset.
        scopes: crate::boxapi::downscope::DOWNSCOPE_SCOPES
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        // "Manage users" and "Manage enterprise users".
        user_scopes: [MANAGE_APP_USERS, MANAGE_MANAGED_USERS].map(str::to_owned).into(),
    });
    let item = |kind: &'static str, id: &str, name: &str, owner: &str, link: Option<&str>| FakeItem {
        kind,
        id: id.to_owned(),
        name: name.to_owned(),
        owner: owner.to_owned(),
        collaborators: Vec::new(),
        shared_link: link.map(str::to_owned),
    };
    fake.add_item(item(
        "folder",
        SERVICE_ACCOUNT_FOLDER_ID,
        "Portal",
        SERVICE_ACCOUNT_ID,
        None,
    ));
    fake.add_item(item(
        "file",
        SERVICE_ACCOUNT_FILE_ID,
        "welcome.pdf",
        SERVICE_ACCOUNT_ID,
        Some(SHARED_LINK),
    ));
    fake.add_item(item("folder", APP_USER_FOLDER_ID, "Ada's files", APP_USER_IDS[0], None));
    fake.add_item(item("file", APP_USER_FILE_ID, "ada.docx", APP_USER_IDS[0], None));
    let user = |id: &str, name: &str, kind: UserKind, enterprise: &str| {
        let login = format!("{}@example.com", name.to_ascii_lowercase().replace(' ', "."));
        FakeUser::new(id, name, &login, enterprise, kind)
    };
    let mine = UserKind::AppUser {
        client_id: client_id.clone(),
    };
    for ((id, name), external_id) in APP_USER_IDS
        .iter()
        .zip(["Ada App", "Bob App", "Cy App"])
        .zip(APP_USER_EXTERNAL_IDS)
    {
        fake.add_user(user(id, name, mine.clone(), ENTERPRISE_ID).with_external_app_user_id(external_id));
    }
    fake.add_user(user(MANAGED_USER_ID, "Mia Managed", UserKind::Managed, ENTERPRISE_ID));
    fake.add_user(user(ADMIN_USER_ID, "Alex Admin", UserKind::Managed, ENTERPRISE_ID).with_role("admin"));
    fake.add_user(user(COADMIN_USER_ID, "Cora Coadmin", UserKind::Managed, ENTERPRISE_ID).with_role("coadmin"));
    fake.add_user(user(INACTIVE_USER_ID, "Ivan Inactive", UserKind::Managed, ENTERPRISE_ID).with_status("inactive"));
    fake.add_user(user(EXTERNAL_USER_ID, "Eve External", UserKind::External, "8000001"));
    fake.add_user(user(
        OTHER_APP_USER_ID,
        "Olaf Other",
        UserKind::AppUser {
            client_id: "someotherapp".to_owned(),
        },
        ENTERPRISE_ID,
    ));
    SeededApp {
        client_id,
        client_secret: SecretString::from(client_secret),
        kid,
    }
}

/// The app's config JSON exactly as the Box developer console downloads it,
/// with the private key encrypted the way the console encrypts it.
pub fn box_config_json(
    app: &SeededApp,
    key: &RsaPrivateKey,
    passphrase: &SecretString,
) -> Result<SecretString, KeyError> {
    let pem = encrypt_private_key(key, passphrase, KeyEncryption::BoxConsole)?;
    let json = serde_json::json!({
        "boxAppSettings": {
            "clientID": app.client_id,
            "clientSecret": app.client_secret.expose_secret(),
            "appAuth": {
                "publicKeyID": app.kid,
                "privateKey": pem.expose_secret(),
                "passphrase": passphrase.expose_secret(),
            }
        },
        "enterpriseID": ENTERPRISE_ID,
    });
    serde_json::to_string_pretty(&json)
        .map(SecretString::from)
        .map_err(|e| KeyError::Malformed(format!("JSON encoding failed: {e}")))
}
