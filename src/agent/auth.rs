//! Bearer-token authentication of the agent API.

use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

/// Shortest token accepted: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// The shared agent token. Its Debug output is redacted so it cannot reach a log by accident.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Validates a token (trimmed).
    pub fn new(raw: &str) -> Result<Self, String> {
        let t = raw.trim();
        if t.len() < MIN_TOKEN_LEN {
            return Err(format!("agent token must be at least {MIN_TOKEN_LEN} characters"));
        }
        if !t.chars().all(|c| c.is_ascii_graphic()) {
            return Err("agent token must be printable ASCII without spaces".into());
        }
        Ok(Self(t.to_owned()))
    }

    /// A fresh random token (for the guided demo and tests).
    pub fn generate() -> Self {
        Self(format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        ))
    }

    /// The raw value, for writing into a file the agents read.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn header(&self) -> MetadataValue<tonic::metadata::Ascii> {
        format!("Bearer {}", self.0)
            .parse()
            .expect("token is printable ASCII")
    }
}

/// Constant-time comparison, so the token cannot be found byte by byte from response times.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Server side: refuses calls without the token.
#[derive(Clone, Debug)]
pub struct CheckToken(pub Token);

impl tonic::service::Interceptor for CheckToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let want = self.0.header();
        match req.metadata().get("authorization") {
            Some(got) if ct_eq(got.as_bytes(), want.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("invalid agent token")),
            None => Err(Status::unauthenticated("agent token required")),
        }
    }
}

/// Client side: adds the token to every call.
#[derive(Clone, Debug)]
pub struct AddToken(pub Token);

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.header());
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn token_checked_and_redacted() {
        let t = Token::new("0123456789abcdef-secret").unwrap();
        assert!(!format!("{t:?}").contains("secret"));
        assert!(Token::new("short").is_err());
        let mut check = CheckToken(t.clone());
        assert_eq!(
            check.call(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let req = AddToken(t).call(Request::new(())).unwrap();
        assert!(check.call(req).is_ok());
        let wrong = AddToken(Token::new("0123456789abcdef-other!").unwrap())
            .call(Request::new(()))
            .unwrap();
        assert_eq!(
            check.call(wrong).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
