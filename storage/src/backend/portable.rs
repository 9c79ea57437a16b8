//! The portable writer: std files, `pwrite` and `fdatasync`.

use std::os::unix::fs::FileExt;
use std::sync::mpsc::Receiver;

use super::{Batch, Shared, WriteOp, gather};

/// Runs until every sender of `rx` is gone and the queue is drained.
pub(super) fn run(rx: Receiver<WriteOp>, shared: &Shared) {
    let mut carry = None;
    loop {
        let first = match carry.take() {
            Some(op) => op,
            None => match rx.recv() {
                Ok(op) => op,
                Err(_) => return,
            },
        };
        let batch = Batch::new(gather(&rx, first, &mut carry));
        if shared.failed.get().is_some() {
            // A failed log writes nothing more; every waiter hears why.
            batch.finish(Err(String::new()), shared, 0);
            continue;
        }
        let files = batch.files();
        let mut result = Ok(());
        for run in &batch.runs {
            if let Err(e) = run.file.write_all_at(&run.buf, run.offset) {
                result = Err(format!("write: {e}"));
                break;
            }
        }
        let mut syncs = 0;
        if result.is_ok() {
            for file in &files {
                syncs += 1;
                if let Err(e) = file.sync_data() {
                    result = Err(format!("fdatasync: {e}"));
                    break;
                }
            }
        }
        batch.finish(result, shared, syncs);
    }
}
