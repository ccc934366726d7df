//! Identifiers and names that reach file paths or objects, and how they are made.

/// Longest id or name accepted anywhere (the CSI spec recommends at most 128 bytes).
pub const MAX_ID_LEN: usize = 128;

/// Most characters of a caller's value repeated in an error message. gRPC carries the message in
/// a header, and headers over 8 KiB make the client see RESOURCE_EXHAUSTED instead of the answer.
pub const ECHO_LEN: usize = 64;

/// A caller's value as it may appear in a message: quoted, escaped, and cut after [`ECHO_LEN`]
/// characters (the cut says how long the value was). Every message that repeats input uses this.
pub fn echo(value: &str) -> String {
    let escaped: String = value.escape_debug().take(ECHO_LEN + 1).collect();
    if escaped.chars().count() <= ECHO_LEN {
        format!("\"{escaped}\"")
    } else {
        let head: String = escaped.chars().take(ECHO_LEN).collect();
        format!("\"{head}\"... ({} bytes)", value.len())
    }
}

/// Fixed namespace for name-derived volume ids: the same CreateVolume name always yields the
/// same id, which makes CreateVolume idempotent even across a controller restart.
const VOLUME_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x5f1a_7a3e_2c4b_4d8e_9a61_0c3b_7e2d_9f10);

/// The volume id for a CreateVolume name.
pub fn volume_id_for_name(name: &str) -> String {
    format!("vol-{}", uuid::Uuid::new_v5(&VOLUME_NAMESPACE, name.as_bytes()))
}

const SNAPSHOT_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x8c2e_41d7_93b0_4f6a_b5e2_7d19_0a44_c3e8);

const GROUP_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x3f7a_9c12_5be4_4d08_a1c6_e25b_7f90_d4a1);

/// The group snapshot id for a CreateVolumeGroupSnapshot name.
pub fn group_snapshot_id_for_name(name: &str) -> String {
    format!("group-{}", uuid::Uuid::new_v5(&GROUP_NAMESPACE, name.as_bytes()))
}

/// The snapshot id for a CreateSnapshot name.
pub fn snapshot_id_for_name(name: &str) -> String {
    format!(
        "snap-{}",
        uuid::Uuid::new_v5(&SNAPSHOT_NAMESPACE, name.as_bytes())
    )
}

/// Checks an id that may become a path component: non-empty, bounded, only `[A-Za-z0-9._:-]`,
/// not starting with a dot (so never `.` or `..`).
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("{what} is longer than {MAX_ID_LEN} bytes"));
    }
    if id.starts_with('.') {
        return Err(format!("{what} {} starts with a dot", echo(id)));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')))
    {
        return Err(format!("{what} {} contains the character {c:?}", echo(id)));
    }
    Ok(())
}

/// Checks a free-form name (CreateVolume name): non-empty, bounded, no control characters.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if name.len() > MAX_ID_LEN {
        return Err(format!("{what} is longer than {MAX_ID_LEN} bytes"));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(format!("{what} contains a control character"));
    }
    Ok(())
}

/// Checks a path handed to us by the CO: absolute, no NUL, no `..` component, bounded.
pub fn check_path(what: &str, path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if path.len() > 4096 {
        return Err(format!("{what} is longer than 4096 bytes"));
    }
    if !path.starts_with('/') {
        return Err(format!("{what} {} is not absolute", echo(path)));
    }
    if path.contains('\0') {
        return Err(format!("{what} contains NUL"));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(format!("{what} {} contains '..'", echo(path)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_ids_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "a\0b",
            ".hidden",
            "a b",
            &"x".repeat(129),
        ] {
            assert!(check_id("id", bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "vol-1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "some-vol_id.1",
            "store:snap-x",
        ] {
            assert!(check_id("id", good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn hostile_paths_are_refused() {
        for bad in ["", "relative", "/a/../b", "/a\0", "/.."] {
            assert!(check_path("p", bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_path("p", "/var/lib/kubelet/x").is_ok());
    }

    #[test]
    fn echoed_values_are_bounded() {
        assert_eq!(echo("vol-1"), "\"vol-1\"");
        let long = "x".repeat(10_000);
        let e = echo(&long);
        assert!(e.len() < ECHO_LEN + 32, "{e}");
        assert!(e.ends_with("(10000 bytes)"), "{e}");
        // Escaping cannot grow a value past the bound either.
        let ctl = "\u{1}".repeat(4000);
        assert!(echo(&ctl).len() < ECHO_LEN + 32);
        // Multi-byte characters are never cut in half.
        assert!(echo(&"é".repeat(100)).starts_with("\"éé"));
        for bad in [long.as_str(), ctl.as_str(), "/a/../b"] {
            for r in [check_id("id", bad), check_path("p", bad), check_name("n", bad)] {
                if let Err(m) = r {
                    assert!(m.len() < 200, "{m}");
                }
            }
        }
    }

    #[test]
    fn volume_ids_are_stable_per_name() {
        assert_eq!(volume_id_for_name("pvc-1"), volume_id_for_name("pvc-1"));
        assert_ne!(volume_id_for_name("pvc-1"), volume_id_for_name("pvc-2"));
        assert!(check_id("id", &volume_id_for_name("pvc-1")).is_ok());
    }
}
