//! Who is logged in to this machine now, the one platform-specific piece of the live vitals.
//! On Linux, the login records in `utmp` (what `who` reads); Windows (WTSEnumerateSessions)
//! and macOS (`utmpx`) slot in here. Elsewhere nobody is reported.

/// The users logged in now, each once, sorted.
pub fn logged_in() -> Vec<String> {
    let mut users = read_utmp();
    users.sort();
    users.dedup();
    users.truncate(crate::card::MAX_LISTED);
    users
}

#[cfg(target_os = "linux")]
fn read_utmp() -> Vec<String> {
    ["/run/utmp", "/var/run/utmp"].iter().find_map(|p| std::fs::read(p).ok()).map(|b| users_in(&b)).unwrap_or_default()
}

#[cfg(not(target_os = "linux"))]
fn read_utmp() -> Vec<String> {
    vec![]
}

/// glibc's `struct utmp` on Linux: 384 bytes a record, the type at 0, the user at 44 (32 bytes,
/// NUL-padded); type 7 is a user's login.
const RECORD: usize = 384;
const USER_PROCESS: i16 = 7;
const USER_AT: usize = 44;
const USER_LEN: usize = 32;

/// The users of the login records in `bytes` (a whole `utmp` file).
pub fn users_in(bytes: &[u8]) -> Vec<String> {
    bytes
        .chunks_exact(RECORD)
        .filter(|r| i16::from_ne_bytes([r[0], r[1]]) == USER_PROCESS)
        .filter_map(|r| {
            let name = &r[USER_AT..USER_AT + USER_LEN];
            let end = name.iter().position(|b| *b == 0).unwrap_or(USER_LEN);
            let name = String::from_utf8_lossy(&name[..end]).trim().to_string();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: i16, user: &str) -> Vec<u8> {
        let mut r = vec![0u8; RECORD];
        r[..2].copy_from_slice(&kind.to_ne_bytes());
        r[USER_AT..USER_AT + user.len()].copy_from_slice(user.as_bytes());
        r
    }

    #[test]
    fn only_user_logins_count_and_a_torn_record_is_ignored() {
        let mut file = [record(USER_PROCESS, "alice"), record(8, "bob"), record(USER_PROCESS, "carol")].concat();
        file.extend_from_slice(&[7, 0, 1]);
        assert_eq!(users_in(&file), ["alice", "carol"]);
    }
}
