use crate::Caller;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_core::{ApiError, Error, ErrorKind, Origin};

/// Largest response body a [`ServiceClient`] reads into memory.
pub(crate) const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// Calls one service by name, with buffered bodies; what `ctx.client("catalog")` gives.
#[derive(Clone)]
pub struct ServiceClient {
    caller: Caller,
    service: String,
}

impl ServiceClient {
    /// A client of `service` through `caller`.
    pub fn new(caller: Caller, service: &str) -> Self {
        Self {
            caller,
            service: service.to_string(),
        }
    }

    /// Start a request with any method.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        RequestBuilder {
            client: self.clone(),
            method,
            path: path.to_string(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            error: None,
        }
    }

    /// Start a GET.
    pub fn get(&self, path: &str) -> RequestBuilder {
        self.request(Method::GET, path)
    }

    /// Start a POST.
    pub fn post(&self, path: &str) -> RequestBuilder {
        self.request(Method::POST, path)
    }

    /// Start a PUT.
    pub fn put(&self, path: &str) -> RequestBuilder {
        self.request(Method::PUT, path)
    }

    /// Start a DELETE.
    pub fn delete(&self, path: &str) -> RequestBuilder {
        self.request(Method::DELETE, path)
    }
}

/// A request being built; nothing is sent until [`RequestBuilder::send`].
pub struct RequestBuilder {
    client: ServiceClient,
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
    error: Option<Error>,
}

impl RequestBuilder {
    /// Add a header. An invalid name or value fails the request at `send`.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        match (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            (Ok(n), Ok(v)) => {
                self.headers.insert(n, v);
            }
            _ => {
                self.error = Some(Error::new(
                    ErrorKind::InvalidInput,
                    Origin::Internal,
                    format!("invalid header {name:?}"),
                ))
            }
        }
        self
    }

    /// A JSON body.
    pub fn json<T: Serialize + ?Sized>(mut self, body: &T) -> Self {
        match serde_json::to_vec(body) {
            Ok(b) => {
                self.body = Bytes::from(b);
                self.headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            Err(e) => self.error = Some(Error::internal("encoding JSON body").with_source(e)),
        }
        self
    }

    /// A raw body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Send and read the whole response.
    pub async fn send(self) -> Result<ClientResponse, Error> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut req = Request::builder()
            .method(self.method)
            .uri(&self.path)
            .body(Full::new(self.body))
            .map_err(|e| {
                Error::new(
                    ErrorKind::InvalidInput,
                    Origin::Internal,
                    format!("invalid path {:?}", self.path),
                )
                .with_source(e)
            })?;
        *req.headers_mut() = self.headers;
        let service = self.client.service.clone();
        let res = self.client.caller.send(&service, req).await?;
        let (parts, body) = res.into_parts();
        let body = crate::body::read_limited(body, MAX_RESPONSE_BYTES, || {
            format!("reading answer of {service}")
        })
        .await?;
        Ok(ClientResponse {
            service,
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// A whole response from a service.
#[derive(Debug)]
pub struct ClientResponse {
    service: String,
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl ClientResponse {
    /// Turn a non-2xx answer into a typed error that carries the service's own error
    /// code and message. 5xx and 429 are retryable; other 4xx are not.
    pub fn error_for_status(self) -> Result<Self, Error> {
        if self.status.is_success() {
            return Ok(self);
        }
        let api = ApiError::from_json(self.status, &self.body)
            .unwrap_or_else(|| ApiError::new(self.status, ApiError::code_for(self.status), ""));
        let kind = match self.status {
            StatusCode::NOT_FOUND => ErrorKind::NotFound,
            StatusCode::CONFLICT => ErrorKind::Conflict,
            StatusCode::TOO_MANY_REQUESTS => ErrorKind::Overloaded,
            StatusCode::GATEWAY_TIMEOUT => ErrorKind::Timeout,
            s if s.is_server_error() => ErrorKind::Unavailable,
            _ => ErrorKind::InvalidInput,
        };
        let retryable =
            self.status.is_server_error() || self.status == StatusCode::TOO_MANY_REQUESTS;
        Err(Error::new(
            kind,
            Origin::Upstream,
            format!(
                "{} answered {} {}: {}",
                self.service,
                self.status.as_u16(),
                api.code,
                api.message
            ),
        )
        .with_retryable(retryable))
    }

    /// Decode a JSON body (after checking the status).
    pub fn json<T: DeserializeOwned>(self) -> Result<T, Error> {
        let ok = self.error_for_status()?;
        serde_json::from_slice(&ok.body).map_err(|e| {
            Error::new(
                ErrorKind::Protocol,
                Origin::Upstream,
                format!("{} sent unexpected JSON", ok.service),
            )
            .with_source(e)
        })
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}
