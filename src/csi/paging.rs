//! Paging of the List RPCs. A token is the id of the last entry of the previous page, so a page
//! stays valid when entries are added or that entry is deleted in between.

use tonic::Status;

use super::status::invalid;
use crate::ids;

/// Checks `max_entries` and that `token` is empty or an id with `prefix` (else ABORTED, as the
/// spec asks for a token the plugin did not issue).
pub fn check(max_entries: i32, token: &str, prefix: &str) -> Result<(), Status> {
    if max_entries < 0 {
        return Err(invalid("max_entries must not be negative"));
    }
    if !token.is_empty() && (!token.starts_with(prefix) || ids::check_id("token", token).is_err()) {
        return Err(Status::aborted(format!(
            "starting_token {} is not one this driver issued",
            ids::echo(token)
        )));
    }
    Ok(())
}

/// The page of `items` after `token` (ordered by `key`), at most `max_entries` long (0: all), and
/// the token of the next page (empty on the last).
pub fn page<T>(
    mut items: Vec<T>,
    key: impl Fn(&T) -> &str,
    token: &str,
    max_entries: i32,
) -> (Vec<T>, String) {
    items.sort_by(|a, b| key(a).cmp(key(b)));
    items.retain(|i| key(i) > token);
    let take = if max_entries == 0 {
        items.len()
    } else {
        (max_entries as usize).min(items.len())
    };
    let next = if take < items.len() {
        key(&items[take - 1]).to_owned()
    } else {
        String::new()
    };
    items.truncate(take);
    (items, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_tokens() {
        let ids = vec!["vol-c", "vol-a", "vol-b"];
        let (p1, t1) = page(ids.clone(), |s| s, "", 2);
        assert_eq!((p1, t1.as_str()), (vec!["vol-a", "vol-b"], "vol-b"));
        let (p2, t2) = page(ids.clone(), |s| s, &t1, 2);
        assert_eq!((p2, t2.as_str()), (vec!["vol-c"], ""));
        // The token's own entry deleted meanwhile: the next page still follows it.
        let (p3, _) = page(vec!["vol-a", "vol-c"], |s| s, "vol-b", 0);
        assert_eq!(p3, vec!["vol-c"]);
        assert!(check(0, "bogus", "vol-").is_err());
        assert!(check(-1, "", "vol-").is_err());
        assert!(check(5, "vol-x", "vol-").is_ok());
    }
}
