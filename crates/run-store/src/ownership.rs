//! One owner per run among the pods of a region that share one PostgreSQL database.
//!
//! A pod joins as a *member* (one per process start) with a lease it renews; a run is claimed
//! by a member, which raises the run's *epoch*. Every write of the owner carries its [`Fence`]
//! (member and epoch), and the database takes the write only while the run's row still names
//! them: a deposed owner — paused, cut off, or simply late — can never append, whatever it
//! believes. Leases are judged in the database's time, so the pods' clocks do not matter.

use std::sync::Arc;

/// An owner's proof, carried by each of its writes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    pub member: Arc<str>,
    pub epoch: i64,
}

/// Who holds a run that another member asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub member: String,
    /// Where the owner serves requests (its pod's own address).
    pub address: String,
}

/// What a claim came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The run is this member's; its writes carry this fence.
    Owned(Fence),
    /// A live member holds it.
    Held(Owner),
}

/// A member as the region's status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub member: String,
    pub pod: String,
    pub address: String,
    /// Whether its lease still runs.
    pub live: bool,
    /// Runs it owns.
    pub runs: i64,
}

/// Who joins: this process.
#[derive(Debug, Clone)]
pub struct Joining {
    pub member: Arc<str>,
    /// The pod's stable name (a StatefulSet's): a new member under the same name ends the
    /// leases of the name's earlier members, which cannot still run.
    pub pod: String,
    pub region: String,
    pub address: String,
}

pub(crate) mod sql {
    /// `$1` member, `$2` pod, `$3` region, `$4` address, `$5` lease seconds.
    pub const JOIN: &str = "INSERT INTO crdt_pods (member, pod, region, address, lease_expires) \
        VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) \
        ON CONFLICT (member) DO UPDATE SET lease_expires = EXCLUDED.lease_expires, \
        address = EXCLUDED.address";
    /// Ends the leases of the pod name's earlier members (`$1` member, `$2` pod).
    pub const END_EARLIER: &str =
        "UPDATE crdt_pods SET lease_expires = now() WHERE pod = $2 AND member <> $1 \
         AND lease_expires > now()";
    /// Forgets members gone for an hour (their runs' rows stay, claimable).
    pub const FORGET_GONE: &str =
        "DELETE FROM crdt_pods WHERE lease_expires < now() - interval '1 hour'";
    /// `$1` member, `$2` lease seconds; returns whether the lease was still running.
    pub const RENEW: &str = "WITH old AS (SELECT lease_expires > now() AS running \
        FROM crdt_pods WHERE member = $1) \
        UPDATE crdt_pods SET lease_expires = now() + make_interval(secs => $2) \
        WHERE member = $1 RETURNING (SELECT running FROM old) AS running";
    pub const LEAVE_RUNS: &str = "UPDATE crdt_run_owners SET member = NULL WHERE member = $1";
    pub const RELEASE_ROLE: &str =
        "UPDATE crdt_roles SET member = NULL WHERE role = $1 AND member = $2";
    pub const LEAVE_ROLES: &str = "UPDATE crdt_roles SET member = NULL WHERE member = $1";
    /// `$1` role, `$2` member: as [`CLAIM`], returning the holder afterwards.
    pub const CLAIM_ROLE: &str = "INSERT INTO crdt_roles AS r (role, member, since) \
        SELECT $1, $2, now() WHERE EXISTS (SELECT 1 FROM crdt_pods \
            WHERE member = $2 AND lease_expires > now()) \
        ON CONFLICT (role) DO UPDATE SET member = EXCLUDED.member, since = now() \
        WHERE r.member IS NULL OR r.member = EXCLUDED.member OR NOT EXISTS ( \
            SELECT 1 FROM crdt_pods p WHERE p.member = r.member AND p.lease_expires > now()) \
        RETURNING member";
    pub const LEAVE: &str = "DELETE FROM crdt_pods WHERE member = $1";
    /// `$1` run, `$2` member. Taken when nobody holds it, this member did, or its holder's
    /// lease lapsed; and only by a member whose own lease runs.
    pub const CLAIM: &str = "INSERT INTO crdt_run_owners AS o (run_id, member, epoch, since) \
        SELECT $1, $2, 1, now() WHERE EXISTS (SELECT 1 FROM crdt_pods \
            WHERE member = $2 AND lease_expires > now()) \
        ON CONFLICT (run_id) DO UPDATE SET member = EXCLUDED.member, epoch = o.epoch + 1, \
            since = now() \
        WHERE o.member IS NULL OR o.member = EXCLUDED.member OR NOT EXISTS ( \
            SELECT 1 FROM crdt_pods p WHERE p.member = o.member AND p.lease_expires > now()) \
        RETURNING epoch";
    pub const HOLDER: &str = "SELECT o.member AS member, p.address AS address, \
        COALESCE(p.lease_expires > now(), false) AS live, \
        EXISTS (SELECT 1 FROM crdt_pods WHERE member = $2 AND lease_expires > now()) AS joined \
        FROM crdt_run_owners o LEFT JOIN crdt_pods p ON p.member = o.member \
        WHERE o.run_id = $1";
    /// The run's live holder, if any (`$1` run): read before claiming, so a pod asking for a
    /// run someone holds takes no lock on its row (the holder's appends lock it to check).
    pub const LIVE_HOLDER: &str = "SELECT o.member AS member, p.address AS address \
        FROM crdt_run_owners o JOIN crdt_pods p ON p.member = o.member \
        WHERE o.run_id = $1 AND p.lease_expires > now()";
    /// `$1` run, `$2` member, `$3` epoch.
    pub const RELEASE: &str = "UPDATE crdt_run_owners SET member = NULL \
        WHERE run_id = $1 AND member = $2 AND epoch = $3";
    pub const MEMBERS: &str = "SELECT p.member, p.pod, p.address, \
        p.lease_expires > now() AS live, \
        (SELECT count(*) FROM crdt_run_owners o WHERE o.member = p.member) AS runs \
        FROM crdt_pods p ORDER BY p.pod, p.started_at";
}
