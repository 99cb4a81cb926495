//! Finding secrets in text before it is published.
//!
//! Each rule is a regex; when it has a group named `s`, only that group is the secret (so
//! `password=hunter2` becomes `password=[REDACTED:password]` and the reader still sees *what*
//! was hidden). Every secret becomes the same fixed marker whatever its length, so the length of
//! a short secret is not revealed either.

use regex::Regex;

/// A redaction rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub pattern: Regex,
}

/// Why a user-given pattern was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedactError {
    #[error("--redact pattern {pattern:?} is not a valid regular expression: {source}")]
    BadPattern {
        pattern: String,
        #[source]
        source: regex::Error,
    },
}

/// The built-in rules: common ways secrets appear in commands and their output.
const BUILTIN: &[(&str, &str)] = &[
    ("private-key", r"(?s)(?P<s>-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?-----END [A-Z0-9 ]*PRIVATE KEY-----)"),
    (
        "password",
        // No `\b` before the keyword: `DB_PASSWORD=` and `xpassword=` must match too.
        r#"(?i)(?:password|passwd|pwd|pass|secret|token|api[_-]?key|access[_-]?key|secret[_-]?key|client[_-]?secret)\s*[=:]\s*(?P<s>"[^"]*"|'[^']*'|[^\s"'&;,]+)"#,
    ),
    ("cli-password", r#"(?i)--(?:password|passwd|pass|token|secret|api-key)(?:=|\s+)(?P<s>"[^"]*"|'[^']*'|\S+)"#),
    ("bearer", r"(?i)\bbearer\s+(?P<s>[A-Za-z0-9._~+/=-]{8,})"),
    ("basic-auth", r"(?i)\bbasic\s+(?P<s>[A-Za-z0-9+/]{8,}={0,2})"),
    ("aws-access-key", r"\b(?P<s>(?:AKIA|ASIA)[0-9A-Z]{16})\b"),
    ("github-token", r"\b(?P<s>gh[pousr]_[A-Za-z0-9]{30,})\b"),
    ("slack-token", r"\b(?P<s>xox[abprs]-[A-Za-z0-9-]{10,})\b"),
    ("jwt", r"\b(?P<s>eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,})"),
    ("url-credentials", r"://[^/\s:@]+:(?P<s>[^/\s@]+)@"),
];

/// What to hide.
#[derive(Debug, Clone)]
pub struct Redactor {
    rules: Vec<Rule>,
}

/// The marker a secret is replaced with.
pub fn marker(rule: &str) -> String {
    format!("[REDACTED:{rule}]")
}

impl Redactor {
    /// The built-in rules plus `extra` patterns (named `custom-1`, `custom-2`, …).
    pub fn new(extra: &[String]) -> Result<Self, RedactError> {
        let mut rules: Vec<Rule> = BUILTIN
            .iter()
            .filter_map(|(name, pattern)| Some(Rule { name: (*name).to_string(), pattern: Regex::new(pattern).ok()? }))
            .collect();
        for (i, p) in extra.iter().enumerate() {
            let pattern = Regex::new(p).map_err(|source| RedactError::BadPattern { pattern: p.clone(), source })?;
            rules.push(Rule { name: format!("custom-{}", i + 1), pattern });
        }
        Ok(Self { rules })
    }

    /// `text` with every secret replaced by its marker, and `(rule, count)` of what was hidden.
    pub fn redact(&self, text: &str) -> (String, Vec<(String, u32)>) {
        let mut out = text.to_string();
        let mut found = Vec::new();
        for rule in &self.rules {
            let mut count = 0u32;
            let mut result = String::with_capacity(out.len());
            let mut last = 0;
            for caps in rule.pattern.captures_iter(&out) {
                let Some(m) = caps.name("s").or_else(|| caps.get(0)) else { continue };
                if m.start() < last || m.is_empty() {
                    continue;
                }
                result.push_str(&out[last..m.start()]);
                result.push_str(&marker(&rule.name));
                last = m.end();
                count += 1;
            }
            if count > 0 {
                result.push_str(&out[last..]);
                out = result;
                found.push((rule.name.clone(), count));
            }
        }
        (out, found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redact(s: &str) -> String {
        Redactor::new(&[]).unwrap().redact(s).0
    }

    #[test]
    fn common_secrets_are_hidden_and_the_rest_kept() {
        assert_eq!(redact("echo password=hunter2"), "echo password=[REDACTED:password]");
        assert_eq!(redact("mysql --password 's3 cret' -h db"), "mysql --password [REDACTED:cli-password] -h db");
        assert_eq!(redact("Authorization: Bearer abcdefghijklmnop"), "Authorization: Bearer [REDACTED:bearer]");
        assert_eq!(redact("key AKIAABCDEFGHIJKLMNOP used"), "key [REDACTED:aws-access-key] used");
        assert_eq!(redact("https://bob:pa55@example.com/x"), "https://bob:[REDACTED:url-credentials]@example.com/x");
        let pem = "a\n-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\nBBBB\n-----END OPENSSH PRIVATE KEY-----\nb";
        assert_eq!(redact(pem), "a\n[REDACTED:private-key]\nb");
        assert_eq!(redact("df -h / && uptime"), "df -h / && uptime");
        assert_eq!(redact("export DB_PASSWORD=s3cr3t; run"), "export DB_PASSWORD=[REDACTED:password]; run");
        assert_eq!(redact("aws_secret_access_key = abc/def"), "aws_secret_access_key = [REDACTED:password]");
    }

    #[test]
    fn custom_patterns_apply_and_bad_ones_are_refused() {
        let r = Redactor::new(&["acme-[0-9]+".into()]).unwrap();
        assert_eq!(r.redact("id acme-4242 ok").0, "id [REDACTED:custom-1] ok");
        assert!(Redactor::new(&["(".into()]).is_err());
    }
}
