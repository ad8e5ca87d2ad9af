//! Sinch's Webhooks and Apps APIs, for the doctor, the `webhook` commands and the start-up check: each call
//! within 10 s, tried again as a query would be when Sinch is busy (429, 5xx, a broken connection) — but a
//! creation only after a 429, which says it was not taken, and a deletion that finds the webhook gone after a try
//! that may have been taken succeeded — errors classified as for queries.

use std::time::Duration;

use reqwest::{
    Method,
    header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE},
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::time::Instant;

use super::{
    CONNECT_TIMEOUT, Error, MAX_ANSWER, SinchClient, USER_AGENT, classify, error_chain, read_capped, retry_after,
    wire::WebhookJson, wire::WebhookListJson,
};
use crate::webhook::signature;

/// How long one call of these APIs may take, token included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl SinchClient {
    /// Obtains a token (OAuth2) to prove the credentials; HTTP Basic has none to obtain and passes.
    pub async fn obtain_token(&self) -> Result<(), Error> {
        self.auth
            .header(&self.http, Instant::now() + CALL_TIMEOUT)
            .await
            .map(drop)
    }

    /// The app's `rate_limits.webhooks` (callbacks per second); `None` when Sinch does not say. An app Sinch does
    /// not know, or one of another region, is a 404.
    pub async fn app_webhook_rate(&self, app_id: &str) -> Result<Option<u64>, Error> {
        let app: serde_json::Value = self.call(Method::GET, &["apps", app_id], None::<&()>, None).await?;
        Ok(app.pointer("/rate_limits/webhooks").and_then(serde_json::Value::as_u64))
    }

    /// Every webhook of the app.
    pub async fn list_webhooks(&self, app_id: &str) -> Result<Vec<WebhookJson>, Error> {
        let list: WebhookListJson = self
            .call(Method::GET, &["apps", app_id, "webhooks"], None::<&()>, None)
            .await?;
        Ok(list.webhooks)
    }

    /// Creates a webhook (its `id` is left to Sinch).
    pub async fn create_webhook(&self, webhook: &WebhookJson) -> Result<WebhookJson, Error> {
        let mut body = serde_json::to_value(webhook).expect("a webhook serialises");
        if let Some(fields) = body.as_object_mut() {
            fields.remove("id");
        }
        self.call(Method::POST, &["webhooks"], Some(&body), None).await
    }

    /// Changes the `fields` of webhook `id` to their values in `webhook` (`update_mask` joined with commas, as
    /// Sinch's Node and .NET SDKs send it).
    pub async fn update_webhook(&self, id: &str, webhook: &WebhookJson, fields: &[&str]) -> Result<WebhookJson, Error> {
        let all = serde_json::to_value(webhook).expect("a webhook serialises");
        let body: serde_json::Map<String, serde_json::Value> =
            fields.iter().map(|f| ((*f).to_owned(), all[*f].clone())).collect();
        let mask = fields.join(",");
        self.call(Method::PATCH, &["webhooks", id], Some(&body), Some(&mask))
            .await
    }

    /// Deletes webhook `id`.
    pub async fn delete_webhook(&self, id: &str) -> Result<(), Error> {
        self.call::<serde_json::Value>(Method::DELETE, &["webhooks", id], None::<&()>, None)
            .await
            .map(drop)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&impl Serialize>,
        update_mask: Option<&str>,
    ) -> Result<T, Error> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        let mut attempt = 0;
        // Whether an earlier try may have been carried out, its answer lost: it reached Sinch, which did not answer
        // 429.
        let mut maybe_taken = false;
        loop {
            attempt += 1;
            let mut sent = false;
            let error = match self
                .call_once(&method, segments, body, update_mask, deadline, &mut sent)
                .await
            {
                Ok(answer) => return Ok(answer),
                Err(error) => error,
            };
            let status = match &error {
                Error::Api(e) => Some(e.http_status),
                _ => None,
            };
            if method == Method::DELETE && maybe_taken && status == Some(404) {
                // Gone is what a deletion asks for: read as the answer without a body (JSON's null) it would have had.
                return serde_json::from_value(serde_json::Value::Null).map_err(|e| Error::Malformed {
                    status: 404,
                    detail: e.to_string(),
                });
            }
            maybe_taken |= sent && status != Some(429);
            let again = match method {
                Method::POST => status == Some(429),
                _ => error.is_retryable(),
            };
            if !again || !self.pause_before_retry(&error, attempt, deadline).await {
                return Err(error);
            }
        }
    }

    async fn call_once<T: DeserializeOwned>(
        &self,
        method: &Method,
        segments: &[&str],
        body: Option<&impl Serialize>,
        update_mask: Option<&str>,
        deadline: Instant,
        sent: &mut bool,
    ) -> Result<T, Error> {
        let call = async {
            self.admit(deadline).await?;
            let auth = self.auth.header(&self.http, deadline).await?;
            let mut url = self.project_url.clone();
            url.path_segments_mut()
                .map_err(|()| Error::Connect("the API URL cannot take a path".into()))?
                .extend(segments);
            if let Some(mask) = update_mask {
                url.query_pairs_mut().append_pair("update_mask", mask);
            }
            let mut request = self
                .http
                .request(method.clone(), url)
                .header(AUTHORIZATION, auth.as_ref().clone())
                .header(ACCEPT, "application/json");
            if let Some(body) = body {
                let json = serde_json::to_vec(body).expect("JSON always serialises");
                request = request.header(CONTENT_TYPE, "application/json").body(json);
            }
            // Sent, unless the connection could not be made (a token's failure came before).
            *sent = true;
            let response = request.send().await.map_err(|e| {
                *sent = !e.is_connect();
                Error::Connect(error_chain(&e))
            })?;
            let status = response.status().as_u16();
            let wait = retry_after(response.headers());
            let bytes = read_capped(response, MAX_ANSWER).await.map_err(Error::Connect)?;
            if !(200..300).contains(&status) {
                if status == 401 {
                    // Not used again, as for queries.
                    self.auth.expired(&auth);
                }
                return Err(classify(status, &bytes, wait, false));
            }
            // An answer without a body (a 204 to a deletion) reads as JSON's null.
            let bytes = if bytes.trim_ascii().is_empty() {
                &b"null"[..]
            } else {
                &bytes[..]
            };
            serde_json::from_slice(bytes).map_err(|e| Error::Malformed {
                status,
                detail: e.to_string(),
            })
        };
        tokio::time::timeout_at(deadline, call)
            .await
            .map_err(|_| Error::DeadlineExceeded)?
    }

    /// Posts `body` to `target` signed with `secret` as Sinch signs a callback (unsigned without one); returns the
    /// HTTP status, and where a redirect points (it is not followed: Sinch posts to the target, and is not known to
    /// follow one). With `own_listener`, the target is this machine's webhook port in sandbox mode, serving TLS with
    /// the operator's certificate: any certificate is accepted there, as the in-process sandbox accepts it.
    pub async fn post_signed_callback(
        &self,
        target: &str,
        secret: Option<&str>,
        body: Vec<u8>,
        own_listener: bool,
    ) -> Result<(u16, Option<String>), Error> {
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .danger_accept_invalid_certs(own_listener)
            .build()
            .map_err(|e| Error::Connect(error_chain(&e)))?;
        let request = secret
            .map(|secret| signature::headers(secret, &body))
            .into_iter()
            .flatten()
            .fold(http.post(target), |request, (name, value)| request.header(name, value));
        let response = request
            .timeout(CALL_TIMEOUT)
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| Error::Connect(error_chain(&e)))?;
        // Where it points, relative to the target when written so.
        let location = response.headers().get(reqwest::header::LOCATION).map(|l| {
            let written = String::from_utf8_lossy(l.as_bytes()).into_owned();
            response.url().join(&written).map_or(written, String::from)
        });
        Ok((response.status().as_u16(), location))
    }
}
