//! Signature verification of many messages at once.
//!
//! Batch verification checks n signatures in roughly half the time of n
//! single checks, but only says whether all of them are good; when a batch
//! fails, [`verify_each`] falls back to single checks to name the bad ones.

use crate::error::VerifyError;
use crate::message::{Authenticator, Envelope};
use ed25519_dalek::{Signature, VerifyingKey};

/// Checks every envelope's ed25519 signature in one batch: `Ok` only if all
/// are signed and valid.
pub fn verify_batch(envs: &[&Envelope]) -> Result<(), VerifyError> {
    let mut msgs = Vec::with_capacity(envs.len());
    let mut sigs = Vec::with_capacity(envs.len());
    let mut keys: Vec<VerifyingKey> = Vec::with_capacity(envs.len());
    for e in envs {
        let Authenticator::Signature(s) = e.authenticator() else {
            return Err(match e.authenticator() {
                Authenticator::AeadTag(_) => VerifyError::Sealed,
                _ => VerifyError::Unsigned,
            });
        };
        let key = e
            .source()
            .verifying_key()
            .map_err(|_| VerifyError::BadKey)?;
        // Batch verification does not refuse small-order keys the way
        // `verify_strict` does; refuse them here so both paths agree.
        if key.is_weak() {
            return Err(VerifyError::BadKey);
        }
        keys.push(key);
        sigs.push(Signature::from_bytes(&s));
        msgs.push(e.authenticated_bytes());
    }
    ed25519_dalek::verify_batch(&msgs, &sigs, &keys).map_err(|_| VerifyError::BadSignature)
}

/// The verdict for each envelope, in order: one batch check when all are
/// good, single checks otherwise.
pub fn verify_each(envs: &[&Envelope]) -> Vec<Result<(), VerifyError>> {
    if envs.len() > 1 && verify_batch(envs).is_ok() {
        return vec![Ok(()); envs.len()];
    }
    envs.iter().map(|e| e.verify()).collect()
}
