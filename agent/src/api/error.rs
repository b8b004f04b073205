//! The API's error answers: `ApiError` (JSON with a stable code and a human sentence), its
//! mapping from the store's read and write errors, the JSON body extractor that reports in the
//! same shape, and the fallbacks for unknown routes and methods. Async shell (axum types).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::store::{ReadError, WriteError};

/// An error response: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    pub(crate) fn bad_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_json", message)
    }

    pub(crate) fn validation(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            message,
        )
    }

    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token",
        )
    }

    pub(crate) fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body exceeds the limit of {limit} bytes"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Unavailable(_) => {
                tracing::error!(error = %e, "store read failed");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    e.to_string(),
                )
            }
            ReadError::Corrupt(_) => {
                tracing::error!(error = %e, "store read found a corrupt record");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
        let (status, code) = match &e {
            WriteError::Validation(_) => (unprocessable, "validation_failed"),
            WriteError::UnknownCustomer(_) => (unprocessable, "unknown_customer"),
            WriteError::UnknownSku(_) => (unprocessable, "unknown_sku"),
            WriteError::NoPrice { .. } => (unprocessable, "no_price"),
            WriteError::IdempotencyKeyReused => (unprocessable, "idempotency_key_reused"),
            WriteError::EventIdReused(_) => (unprocessable, "event_id_reused"),
            WriteError::OutboxFull(_) | WriteError::Unavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
            WriteError::BadMasterBatch(_)
            | WriteError::AckBeyondLast { .. }
            | WriteError::RewindForward { .. }
            | WriteError::NotRetained { .. }
            | WriteError::Corrupt(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "store write failed");
        }
        Self::new(status, code, e.to_string())
    }
}

/// A JSON body parsed with our error shape: over the limit → 413 `body_too_large`, anything
/// malformed (syntax, types, missing or unknown fields) → 400 `bad_json`. The content type is not
/// required: scanners and PLC gateways often omit it.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or_default();
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(limit)
            } else {
                ApiError::bad_json(rej.body_text())
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_json(format!("invalid JSON body: {e}")))
    }
}

/// The configured body limit, passed to `JsonBody` for its error message.
#[derive(Clone, Copy)]
pub(crate) struct BodyLimit(pub(crate) usize);

pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept this method",
    )
}
