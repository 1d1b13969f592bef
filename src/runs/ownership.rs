//! One owner per run among the pods of a region that share one database.
//!
//! This process joins as a member (`<pod>#<random>`, new at every start) with a lease it
//! renews every third of its length. A run's actor claims the run before it reads anything
//! (`run_store::Store::claim`): then the load sees every write of the previous owner, and its
//! own writes carry the claim's fence, which the database checks. A run held by another live
//! member is not loaded here: its requests are answered `RunError::Elsewhere`, and the edges
//! forward them to the owner. Idle runs are released when they unload, and all of them when
//! the pod leaves (SIGTERM), so they move at once; a pod that dies has its runs taken once its
//! lease lapses. See ARCHITECTURE.md ("Scale-out") for why this design.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use run_store::{Claim, Fence, Joining, Owner, Store, StoreError};
use uuid::Uuid;

/// How long a run is remembered as held elsewhere before this pod asks the database again.
/// A stale entry costs one forward: the old owner claims the run again if it released it, and
/// an owner that is gone makes the forward fail, which forgets the entry.
const ELSEWHERE_TTL: Duration = Duration::from_secs(10);
/// Runs remembered as held elsewhere before expired entries are swept.
const MAX_REMEMBERED: usize = 50_000;

/// This pod's membership: what a run actor needs to claim and fence.
pub struct Ownership {
    store: Arc<dyn Store>,
    /// The address is known once the server is bound (`set_address`).
    joining: std::sync::RwLock<Joining>,
    member: Arc<str>,
    lease: Duration,
    /// Runs another member holds, as last found.
    elsewhere: Mutex<HashMap<Uuid, (Owner, Instant)>>,
    /// Set when the pod leaves (it stops renewing).
    leaving: std::sync::atomic::AtomicBool,
    /// Set once the pod has joined.
    joined: std::sync::atomic::AtomicBool,
}

impl Ownership {
    pub fn new(
        store: Arc<dyn Store>,
        pod: &str,
        region: &str,
        address: &str,
        lease: Duration,
    ) -> Self {
        let member: Arc<str> =
            format!("{pod}#{}", &Uuid::new_v4().simple().to_string()[..8]).into();
        Ownership {
            store,
            joining: std::sync::RwLock::new(Joining {
                member: member.clone(),
                pod: pod.to_string(),
                region: region.to_string(),
                address: address.to_string(),
            }),
            member,
            lease,
            elsewhere: Mutex::new(HashMap::new()),
            leaving: std::sync::atomic::AtomicBool::new(false),
            joined: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn member(&self) -> &Arc<str> {
        &self.member
    }

    fn joining(&self) -> Joining {
        self.joining
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn address(&self) -> String {
        self.joining().address
    }

    /// Where the other pods reach this one, once the server is bound (before `join`).
    pub fn set_address(&self, address: String) {
        self.joining
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .address = address;
    }

    fn lease_secs(&self) -> f64 {
        self.lease.as_secs_f64()
    }

    pub async fn join(&self) -> Result<(), StoreError> {
        let joining = self.joining();
        self.store.join(&joining, self.lease_secs()).await?;
        self.joined
            .store(true, std::sync::atomic::Ordering::Relaxed);
        log::info!(
            "cluster: joined as {} ({}), lease {} ms",
            joining.member,
            joining.address,
            self.lease.as_millis()
        );
        Ok(())
    }

    /// Renews the lease; `Ok(false)` when it had lapsed (others may hold this pod's runs now).
    pub async fn renew(&self) -> Result<bool, StoreError> {
        let running = self.store.renew(&self.member, self.lease_secs()).await?;
        if !running {
            // Forgotten, or lapsed: join again (the row may be gone).
            self.store.join(&self.joining(), self.lease_secs()).await?;
        }
        Ok(running)
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    pub fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    /// From now on this pod claims nothing and does not renew (it is handing its runs over).
    pub fn start_leaving(&self) {
        self.leaving
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Releases every run and ends the membership: the other pods take the runs at once.
    pub async fn leave(&self) -> Result<(), StoreError> {
        self.start_leaving();
        self.store.leave(&self.member).await
    }

    /// Joined, and not leaving.
    pub fn is_member(&self) -> bool {
        self.joined.load(std::sync::atomic::Ordering::Relaxed) && !self.is_leaving()
    }

    pub fn is_leaving(&self) -> bool {
        self.leaving.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Claims the run; a live holder elsewhere is remembered.
    pub async fn claim(&self, run_id: Uuid) -> Result<Claim, StoreError> {
        if self.is_leaving() {
            return Err(StoreError::Unavailable(
                "this pod is leaving; another pod serves the run".into(),
            ));
        }
        let claim = self.store.claim(run_id, &self.member).await?;
        match &claim {
            Claim::Owned(_) => self.forget(run_id),
            Claim::Held(owner) => self.remember(run_id, owner.clone()),
        }
        Ok(claim)
    }

    fn remember(&self, run_id: Uuid, owner: Owner) {
        let mut known = self.lock();
        // Bounded: expired entries go when it grows large.
        if known.len() >= MAX_REMEMBERED {
            known.retain(|_, (_, at)| at.elapsed() < ELSEWHERE_TTL);
        }
        known.insert(run_id, (owner, Instant::now()));
    }

    /// Takes or keeps a role one pod plays for the region; whether this pod holds it.
    pub async fn claim_role(&self, role: &str) -> Result<bool, StoreError> {
        self.store.claim_role(role, &self.member).await
    }

    pub async fn release_role(&self, role: &str) -> Result<(), StoreError> {
        self.store.release_role(role, &self.member).await
    }

    /// The run's live holder, read without claiming; remembered when it is another pod.
    pub async fn holder(&self, run_id: Uuid) -> Result<Option<Owner>, StoreError> {
        let holder = self.store.holder(run_id).await?;
        if let Some(owner) = holder.as_ref().filter(|o| *o.member != *self.member) {
            self.remember(run_id, owner.clone());
        }
        Ok(holder)
    }

    pub async fn release(&self, run_id: Uuid, fence: &Fence) -> Result<(), StoreError> {
        self.store.release(run_id, fence).await
    }

    /// The run's owner elsewhere, if this pod found one lately.
    pub fn elsewhere(&self, run_id: Uuid) -> Option<Owner> {
        let mut known = self.lock();
        match known.get(&run_id) {
            Some((owner, at)) if at.elapsed() < ELSEWHERE_TTL => Some(owner.clone()),
            Some(_) => {
                known.remove(&run_id);
                None
            }
            None => None,
        }
    }

    /// Forgets where the run was: the owner did not answer, or this pod owns it now.
    pub fn forget(&self, run_id: Uuid) {
        self.lock().remove(&run_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, (Owner, Instant)>> {
        self.elsewhere.lock().unwrap_or_else(|p| p.into_inner())
    }
}
