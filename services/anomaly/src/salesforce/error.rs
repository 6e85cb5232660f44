//! Salesforce failures and what to do about each: retry soon, wait, stop the sync, or give up.

/// What a failure calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// May pass on a retry with backoff: connection errors, timeouts, 5xx, `UNABLE_TO_LOCK_ROW`.
    Transient,
    /// The org's API limit is spent: wait long, do not hammer.
    RateLimited,
    /// Credentials are refused: pause the whole sync.
    Auth,
    /// The request can never pass as it is (validation, field errors): give up on the record.
    Permanent,
    /// Not recognised: a short retry window, then give up.
    Unknown,
}

impl ErrorClass {
    /// A name for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::Auth => "auth",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Unknown => "unknown",
        }
    }
}

/// Classifies a Salesforce error code (`errorCode` of an API error, `statusCode` of a record
/// result, or `error` of an OAuth response).
pub fn classify_code(code: &str) -> ErrorClass {
    match code {
        "UNABLE_TO_LOCK_ROW"
        | "SERVER_UNAVAILABLE"
        | "QUERY_TIMEOUT"
        | "REQUEST_RUNNING_TOO_LONG"
        | "UNKNOWN_EXCEPTION" => ErrorClass::Transient,
        "REQUEST_LIMIT_EXCEEDED" | "TOO_MANY_REQUESTS" | "CONCURRENT_REQUESTS_LIMIT_EXCEEDED" => {
            ErrorClass::RateLimited
        }
        "INVALID_SESSION_ID"
        | "INVALID_AUTH_HEADER"
        | "invalid_grant"
        | "invalid_client"
        | "invalid_client_id"
        | "unauthorized_client"
        | "inactive_user"
        | "inactive_org" => ErrorClass::Auth,
        "INVALID_FIELD"
        | "STRING_TOO_LONG"
        | "REQUIRED_FIELD_MISSING"
        | "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
        | "INVALID_FIELD_FOR_INSERT_UPDATE"
        | "FIELD_CUSTOM_VALIDATION_EXCEPTION"
        | "FIELD_INTEGRITY_EXCEPTION"
        | "INVALID_TYPE"
        | "INVALID_TYPE_ON_FIELD_IN_RECORD"
        | "MALFORMED_ID"
        | "INVALID_ID_FIELD"
        | "INVALID_CROSS_REFERENCE_KEY"
        | "NUMBER_OUTSIDE_VALID_RANGE"
        | "DUPLICATE_VALUE"
        | "DUPLICATE_EXTERNAL_ID"
        | "JSON_PARSER_ERROR"
        | "MALFORMED_QUERY"
        | "INVALID_QUERY_FILTER_OPERATOR"
        | "NOT_FOUND"
        | "ENTITY_IS_DELETED"
        | "INSUFFICIENT_ACCESS_OR_READONLY"
        | "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY"
        | "API_DISABLED_FOR_ORG" => ErrorClass::Permanent,
        _ => ErrorClass::Unknown,
    }
}

/// A failed Salesforce call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SalesforceError {
    /// The request did not reach Salesforce or got no answer (connection refused, reset,
    /// timeout).
    #[error("Salesforce unreachable: {0}")]
    Connection(String),
    /// The token endpoint refused the credentials.
    #[error("Salesforce login refused: {code}: {description}")]
    Login {
        /// OAuth `error` (`invalid_grant`, `invalid_client`, ...).
        code: String,
        /// OAuth `error_description`.
        description: String,
    },
    /// The REST API answered with an error.
    #[error("Salesforce HTTP {status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// `errorCode` of the first error (or the status's name when there was no body).
        code: String,
        /// Its `message`.
        message: String,
    },
    /// The answer did not parse as documented.
    #[error("unexpected Salesforce answer: {0}")]
    Protocol(String),
}

impl SalesforceError {
    /// What this failure calls for.
    pub fn class(&self) -> ErrorClass {
        match self {
            SalesforceError::Connection(_) => ErrorClass::Transient,
            SalesforceError::Login { code, .. } => match classify_code(code) {
                ErrorClass::Unknown | ErrorClass::Permanent => ErrorClass::Auth,
                class => class,
            },
            SalesforceError::Api { status, code, .. } => match classify_code(code) {
                ErrorClass::Unknown if *status >= 500 => ErrorClass::Transient,
                ErrorClass::Unknown if *status == 401 => ErrorClass::Auth,
                ErrorClass::Unknown if *status == 429 => ErrorClass::RateLimited,
                class => class,
            },
            SalesforceError::Protocol(_) => ErrorClass::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, code: &str) -> SalesforceError {
        SalesforceError::Api {
            status,
            code: code.into(),
            message: String::new(),
        }
    }

    #[test]
    fn the_documented_codes_fall_in_their_classes() {
        assert_eq!(
            api(503, "SERVER_UNAVAILABLE").class(),
            ErrorClass::Transient
        );
        assert_eq!(api(502, "").class(), ErrorClass::Transient);
        assert_eq!(
            api(400, "UNABLE_TO_LOCK_ROW").class(),
            ErrorClass::Transient
        );
        assert_eq!(
            api(403, "REQUEST_LIMIT_EXCEEDED").class(),
            ErrorClass::RateLimited
        );
        assert_eq!(api(401, "INVALID_SESSION_ID").class(), ErrorClass::Auth);
        assert_eq!(api(400, "INVALID_FIELD").class(), ErrorClass::Permanent);
        assert_eq!(api(400, "STRING_TOO_LONG").class(), ErrorClass::Permanent);
        assert_eq!(api(400, "SOMETHING_NEW").class(), ErrorClass::Unknown);
        let login = SalesforceError::Login {
            code: "invalid_client".into(),
            description: String::new(),
        };
        assert_eq!(login.class(), ErrorClass::Auth);
        assert_eq!(
            SalesforceError::Connection("refused".into()).class(),
            ErrorClass::Transient
        );
    }
}
