//! Box's users API (box-contract.md §13), called with a bearer token:
//! find a user by `external_app_user_id`, read one, read the token's own
//! user, create an App User. Retried, deadlined and circuit-broken exactly
//! like token requests (the same [`BoxClient::with_retries`]).

use reqwest::{StatusCode, header};
use secrecy::{ExposeSecret as _, SecretString};

use super::{BoxClient, response::failure, transport_error};
use crate::boxapi::{
    BoxId,
    error::BoxApiError,
    users::{BoxUser, USER_FIELDS, UserList},
};

/// The largest users-API answer read (a page of two users is a few KB).
const MAX_BODY: usize = 256 * 1024;

impl BoxClient {
    /// The users whose `external_app_user_id` is `external_id`: at most two
    /// (`limit=2`: Box does not document that the id is unique, so two
    /// answers mean "ambiguous"), with [`USER_FIELDS`].
    pub async fn find_users_by_external_id(
        &self,
        token: &SecretString,
        external_id: &str,
    ) -> Result<Vec<BoxUser>, BoxApiError> {
        let query = [
            ("external_app_user_id", external_id),
            ("fields", USER_FIELDS),
            ("limit", "2"),
        ];
        self.with_retries("users-find", |_| async {
            let response = self.get(&self.users_url, token, &query).await?;
            let list: UserList = read_json(response, StatusCode::OK, &self.clock).await?;
            Ok(list.entries)
        })
        .await
    }

    /// User `id` with [`USER_FIELDS`]; Box's 404 is an error like any refusal.
    pub async fn get_user(&self, token: &SecretString, id: &BoxId) -> Result<BoxUser, BoxApiError> {
        let url = format!("{}/{}", self.users_url, id);
        self.with_retries("users-read", |_| async {
            let response = self.get(&url, token, &[("fields", USER_FIELDS)]).await?;
            read_json(response, StatusCode::OK, &self.clock).await
        })
        .await
    }

    /// The user `token` acts as (`/2.0/users/me`), with [`USER_FIELDS`].
    pub async fn me(&self, token: &SecretString) -> Result<BoxUser, BoxApiError> {
        let url = format!("{}/me", self.users_url);
        self.with_retries("users-me", |_| async {
            let response = self.get(&url, token, &[("fields", USER_FIELDS)]).await?;
            read_json(response, StatusCode::OK, &self.clock).await
        })
        .await
    }

    /// Creates an App User (`is_platform_access_only`) named `name` with
    /// `external_id`, in one attempt: a creation whose answer was lost may
    /// have happened, so the caller looks the user up before trying again.
    pub async fn create_app_user(
        &self,
        token: &SecretString,
        name: &str,
        external_id: &str,
    ) -> Result<BoxUser, BoxApiError> {
        let body = serde_json::json!({
            "name": name,
            "is_platform_access_only": true,
            "external_app_user_id": external_id,
        })
        .to_string();
        self.with_attempts("users-create", 1, |_| async {
            let response = self
                .http
                .post(with_query(&self.users_url, &[("fields", USER_FIELDS)])?)
                .bearer_auth(token.expose_secret())
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::ACCEPT, "application/json")
                .body(body.clone())
                .send()
                .await
                .map_err(transport_error)?;
            read_json(response, StatusCode::CREATED, &self.clock).await
        })
        .await
    }

    async fn get(
        &self,
        url: &str,
        token: &SecretString,
        query: &[(&str, &str)],
    ) -> Result<reqwest::Response, BoxApiError> {
        self.http
            .get(with_query(url, query)?)
            .bearer_auth(token.expose_secret())
            .header(header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(transport_error)
    }
}

/// `url?query`, form-encoded.
fn with_query(url: &str, query: &[(&str, &str)]) -> Result<String, BoxApiError> {
    let query = serde_urlencoded::to_string(query).map_err(|_| BoxApiError::Malformed("query encoding failed"))?;
    Ok(format!("{url}?{query}"))
}

/// The body of a `want` answer as `T`, or the error any other answer stands for.
async fn read_json<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    want: StatusCode,
    clock: &crate::clock::SharedClock,
) -> Result<T, BoxApiError> {
    if response.status() != want {
        return Err(failure(response, clock).await);
    }
    if response.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(BoxApiError::Malformed("the users API's answer is too large"));
    }
    let bytes = response.bytes().await.map_err(transport_error)?;
    if bytes.len() > MAX_BODY {
        return Err(BoxApiError::Malformed("the users API's answer is too large"));
    }
    serde_json::from_slice(&bytes)
        .map_err(|_| BoxApiError::Malformed("the users API's answer is not the user JSON Box documents"))
}
