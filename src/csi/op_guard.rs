//! One operation at a time per volume: a second concurrent call gets ABORTED, as the CSI spec
//! asks, instead of racing the first.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Keys (volume ids, names) with an operation in flight.
#[derive(Debug, Clone, Default)]
pub struct OpGuard {
    /// Held only for a set insert or remove, never across an await.
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Proof that an operation owns a key; dropping it releases the key.
#[derive(Debug)]
pub struct OpTicket {
    busy: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl OpGuard {
    /// Takes `key`, or returns ABORTED when another operation holds it.
    pub fn acquire(&self, key: &str) -> Result<OpTicket, tonic::Status> {
        let mut busy = self.busy.lock().expect("op guard poisoned");
        if !busy.insert(key.to_owned()) {
            return Err(tonic::Status::aborted(format!(
                "an operation on {key} is already in progress"
            )));
        }
        Ok(OpTicket {
            busy: self.busy.clone(),
            key: key.to_owned(),
        })
    }
}

impl Drop for OpTicket {
    fn drop(&mut self) {
        self.busy.lock().expect("op guard poisoned").remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_aborted_until_release() {
        let g = OpGuard::default();
        let t = g.acquire("vol-1").unwrap();
        assert_eq!(g.acquire("vol-1").unwrap_err().code(), tonic::Code::Aborted);
        assert!(g.acquire("vol-2").is_ok());
        drop(t);
        assert!(g.acquire("vol-1").is_ok());
    }
}
