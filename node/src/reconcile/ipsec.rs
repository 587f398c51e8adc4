//! IPsec's part of an update: ESP states and policies for the encrypted
//! networks' peers, or, where XFRM cannot be opened, rules that drop their
//! plaintext (fail closed).

use dataplane::ipsec::{Ipsec, IpsecSpec};

use crate::{Dataplane, error::ApplyError};

impl Dataplane {
    /// Makes this node's IPsec match `spec`. A failure with the drop rules
    /// in place is logged (the network carries nothing until it is fixed);
    /// without them, the update fails.
    pub(crate) fn sync_ipsec(&mut self, spec: IpsecSpec) -> Result<(), ApplyError> {
        if spec.is_empty() && self.ipsec.is_none() {
            if std::mem::take(&mut self.plaintext_blocked) {
                dataplane::ipsec::remove_rules();
            }
            return Ok(());
        }
        self.ipsec_spec = spec.clone();
        if self.ipsec.is_none() {
            match Ipsec::open(self.ipsec_record.as_deref()) {
                Ok(x) => self.ipsec = Some(x),
                Err(open) => {
                    if let Err(block) = dataplane::ipsec::block_plaintext(&spec.vnis) {
                        return Err(ApplyError::IpsecUnavailable { open, block });
                    }
                    self.plaintext_blocked = true;
                    tracing::error!(
                        error = %open,
                        "encrypted networks carry nothing on this node: it cannot program ESP"
                    );
                    return Ok(());
                }
            }
        }
        let ipsec = self.ipsec.as_mut().expect("opened above");
        match ipsec.apply(&spec) {
            Ok(r) if r.total() > 0 => {
                tracing::info!(?r, peers = spec.peers.len(), primary = ?spec.primary, "ipsec applied");
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) if ipsec.blocks(&spec.vnis) => {
                tracing::error!(error = %e, "ipsec: encrypted networks are blocked until this is fixed");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Re-reads the kernel's states (keys included) and policies, and
    /// repairs what drifted from the last spec.
    pub(crate) fn resync_ipsec(&mut self) {
        if let Some(ipsec) = self.ipsec.as_mut() {
            match ipsec.reconcile(&self.ipsec_spec) {
                Ok(r) if r.total() > r.nft_writes => {
                    tracing::warn!(?r, "ipsec drift repaired");
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "ipsec reconcile"),
            }
        }
    }
}
