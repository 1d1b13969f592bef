//! The Store conformance suite: one set of checks of what the runtime relies on, run
//! in-process against both backends. SQLite runs in a temporary directory; PostgreSQL in a
//! fresh database on the server `TEST_DATABASE_URL` names (default the local one); without a
//! server they fail, never skip.

use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use run_store::{
    Attempted, Claim, Fence, Joining, NewEvent, Owner, RunActivity, Snapshot, Store, StoreError,
    Tombstone, Webhook,
};
use uuid::Uuid;

fn at(micros: i64) -> NaiveDateTime {
    DateTime::from_timestamp_micros(1_780_000_000_000_000 + micros)
        .expect("a time")
        .naive_utc()
}

fn event(run_id: Uuid, seq: i64, micros: i64) -> NewEvent {
    NewEvent {
        run_id,
        run_seq: seq,
        event_type: "SET_FLAG".into(),
        payload: Some(format!("{{\"seq\":{seq}}}")),
        user_id: Some("ann".into()),
        created_at: at(micros),
        crdt_changes: vec![seq as u8; 3],
        change_hash: format!("{run_id}-{seq}").into_bytes(),
        source_region: "eu-west".into(),
        lamport: seq * 10,
        kind: Some("setFlag".into()),
        content: Some(format!("{{\"key\":\"k\",\"value\":{seq}}}")),
        fence: None,
    }
}

fn snapshot(run_id: Uuid, covers: i32) -> Snapshot {
    Snapshot {
        id: Uuid::new_v4(),
        run_id,
        data: vec![covers as u8; 8],
        lamport: i64::from(covers) * 10,
        region: "eu-west".into(),
        created_at: at(i64::from(covers)),
        event_count: covers,
        // Every other snapshot carries a projection; older ones have none.
        projection: (covers % 20 == 0).then(|| vec![covers as u8; 3]),
        fence: None,
    }
}

async fn the_log_keeps_order_fields_and_drops_duplicates(store: &dyn Store) {
    let run = Uuid::new_v4();
    let first: Vec<NewEvent> = (1..=3).map(|s| event(run, s, s)).collect();
    assert_eq!(store.append(&first).await.unwrap(), 3);
    // A change already stored for the run is skipped, the new one kept.
    let again = vec![event(run, 3, 3), event(run, 4, 4)];
    assert_eq!(
        store.append(&again).await.unwrap(),
        1,
        "one duplicate skipped"
    );
    let all = store.events_after(run, 0).await.unwrap();
    let seqs: Vec<Option<i64>> = all.iter().map(|e| e.run_seq).collect();
    assert_eq!(seqs, vec![Some(1), Some(2), Some(3), Some(4)]);
    let e = &all[1];
    assert_eq!(e.event_type, "SET_FLAG");
    assert_eq!(e.payload.as_deref(), Some("{\"seq\":2}"));
    assert_eq!(e.crdt_changes.as_deref(), Some(&[2u8, 2, 2][..]));
    assert_eq!((e.lamport, e.user_id.as_deref()), (Some(20), Some("ann")));
    assert_eq!(e.created_at, at(2), "microseconds kept");
    let tail = store.events_after(run, 2).await.unwrap();
    assert_eq!(tail.len(), 2);
    assert!(store
        .events_after(Uuid::new_v4(), 0)
        .await
        .unwrap()
        .is_empty());
}

async fn snapshots_keep_the_newest_and_fall_back(store: &dyn Store) {
    let run = Uuid::new_v4();
    assert!(store.latest_snapshot(run, None).await.unwrap().is_none());
    for covers in [10, 20, 30] {
        store
            .save_snapshot(&snapshot(run, covers), 2)
            .await
            .unwrap();
    }
    let newest = store
        .latest_snapshot(run, None)
        .await
        .unwrap()
        .expect("one");
    assert_eq!((newest.event_count, newest.lamport), (30, 300));
    assert_eq!(newest.data, vec![30u8; 8]);
    assert_eq!(newest.projection, None, "a snapshot written without one");
    let older = store
        .latest_snapshot(run, Some(30))
        .await
        .unwrap()
        .expect("one");
    assert_eq!(older.event_count, 20);
    assert_eq!(
        older.projection,
        Some(vec![20u8; 3]),
        "the projection comes back"
    );
    assert!(
        store
            .latest_snapshot(run, Some(20))
            .await
            .unwrap()
            .is_none(),
        "only the newest two are kept"
    );
}

async fn runs_are_listed_by_id_and_by_activity(store: &dyn Store) {
    let mut runs: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for (i, run) in runs.iter().enumerate() {
        // The last run in this list is the most recently active.
        let events = [event(*run, 1, 1000 + i as i64)];
        store.append(&events).await.unwrap();
    }
    // Stored apart from the other checks' runs: compare among these five only.
    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let page = store.list_runs(after, 2).await.unwrap();
        after = page.last().copied();
        listed.extend(page.iter().copied().filter(|r| runs.contains(r)));
        if page.len() < 2 {
            break;
        }
    }
    let mut by_id = runs.clone();
    by_id.sort();
    assert_eq!(listed, by_id, "every run once, in id order, over pages");

    let mut recent: Vec<RunActivity> = Vec::new();
    let mut cursor: Option<RunActivity> = None;
    loop {
        let page = store.recent_runs(cursor.as_ref(), 2).await.unwrap();
        cursor = page.last().cloned();
        recent.extend(page.iter().filter(|a| runs.contains(&a.run_id)).cloned());
        if page.len() < 2 {
            break;
        }
    }
    runs.reverse();
    let order: Vec<Uuid> = recent.iter().map(|a| a.run_id).collect();
    assert_eq!(order, runs, "most recently active first, over pages");
    assert_eq!(recent[0].last_activity, at(1004));
}

fn tombstone(run_id: Uuid, deleted: bool, decided_at: i64, region: &str) -> Tombstone {
    Tombstone {
        run_id,
        deleted,
        decided_at,
        region: region.into(),
        by: Some("ann".into()),
        purged: false,
    }
}

async fn deletion_is_the_last_decision_and_the_purge_leaves_only_it(store: &dyn Store) {
    let (run, other) = (Uuid::new_v4(), Uuid::new_v4());
    for r in [run, other] {
        store
            .append(&[event(r, 1, 5000), event(r, 2, 5001)])
            .await
            .unwrap();
        store.save_snapshot(&snapshot(r, 2), 3).await.unwrap();
    }
    store
        .save_webhook(&webhook("purge-hook", None, None))
        .await
        .unwrap();
    store.append(&[event(run, 3, 5002)]).await.unwrap();
    assert_eq!(store.tombstone(run).await.unwrap(), None);
    let queued = |d: &Vec<run_store::Delivery>| d.iter().any(|d| d.event.run_id == run);
    let far = (chrono::Utc::now() + chrono::Duration::days(1)).naive_utc();
    assert!(queued(&store.due_deliveries(far, 100_000).await.unwrap()));

    let deleted = tombstone(run, true, 1_000, "eu");
    assert!(store.save_tombstone(&deleted).await.unwrap());
    assert_eq!(store.tombstone(run).await.unwrap(), Some(deleted.clone()));
    // Deleted runs leave both lists; the other stays.
    let listed = store.list_runs(None, 100_000).await.unwrap();
    assert!(!listed.contains(&run) && listed.contains(&other));
    let recent = store.recent_runs(None, 100_000).await.unwrap();
    assert!(recent.iter().all(|a| a.run_id != run));
    assert!(recent.iter().any(|a| a.run_id == other));

    // An earlier decision, or an equal one from a smaller region, loses; a later one wins.
    assert!(!store
        .save_tombstone(&tombstone(run, false, 999, "zz"))
        .await
        .unwrap());
    assert!(!store
        .save_tombstone(&tombstone(run, false, 1_000, "ap"))
        .await
        .unwrap());
    // Regions compare as bytes on both backends ("EU" < "eu", "e-u" < "eu").
    for smaller in ["EU", "e-u"] {
        let t = tombstone(run, false, 1_000, smaller);
        assert!(!store.save_tombstone(&t).await.unwrap(), "{smaller}");
    }
    assert_eq!(store.tombstone(run).await.unwrap(), Some(deleted));
    let restored = tombstone(run, false, 1_000, "us");
    assert!(store.save_tombstone(&restored).await.unwrap());
    assert_eq!(store.tombstone(run).await.unwrap(), Some(restored));
    assert!(store.list_runs(None, 100_000).await.unwrap().contains(&run));
    assert!(store
        .purge_due(i64::MAX, 100)
        .await
        .unwrap()
        .iter()
        .all(|r| *r != run));
    assert!(
        !store.purge_run(run).await.unwrap(),
        "a restored run is not purged"
    );

    // Due by when this store recorded the deletion, not by the time it was decided at.
    store
        .save_tombstone(&tombstone(run, true, 2_000, "eu"))
        .await
        .unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let due = |before| store.purge_due(before, 100_000);
    assert!(!due(now - 60_000).await.unwrap().contains(&run));
    assert!(due(now + 60_000).await.unwrap().contains(&run));
    assert!(store.purge_run(run).await.unwrap());
    assert!(!store.purge_run(run).await.unwrap(), "purged once");
    assert!(store.events_after(run, 0).await.unwrap().is_empty());
    assert!(store.latest_snapshot(run, None).await.unwrap().is_none());
    assert!(store.feed(0, Some(run), 100).await.unwrap().is_empty());
    assert!(!queued(&store.due_deliveries(far, 100_000).await.unwrap()));
    let left = store
        .tombstone(run)
        .await
        .unwrap()
        .expect("the tombstone stays");
    assert!(left.deleted && left.purged);
    // The other run is untouched.
    assert_eq!(store.events_after(other, 0).await.unwrap().len(), 2);
    assert!(store.latest_snapshot(other, None).await.unwrap().is_some());
    // A later restore (from a region still holding the run) clears the purge mark.
    store
        .save_tombstone(&tombstone(run, false, 3_000, "us"))
        .await
        .unwrap();
    let back = store.tombstone(run).await.unwrap().expect("kept");
    assert!(!back.deleted && !back.purged);
    store.delete_webhook("purge-hook").await.unwrap();
}

async fn the_feed_reads_by_cursor_in_commit_order(store: &dyn Store) {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let start = store.last_event_id().await.unwrap();
    store
        .append(&[event(a, 1, 1), event(b, 1, 1)])
        .await
        .unwrap();
    store.append(&[event(a, 2, 2)]).await.unwrap();
    // A duplicate makes no second event.
    store
        .append(&[event(a, 2, 2), event(b, 2, 3)])
        .await
        .unwrap();
    let all = store.feed(start, None, 100).await.unwrap();
    let seen: Vec<(Uuid, i64)> = all
        .iter()
        .map(|r| (r.run_id, r.lamport.unwrap() / 10))
        .collect();
    assert_eq!(seen, vec![(a, 1), (b, 1), (a, 2), (b, 2)]);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "cursors ascend");
    assert_eq!(store.last_event_id().await.unwrap(), all[3].id);
    let r = &all[2];
    assert_eq!(
        (r.kind.as_deref(), r.user_id.as_deref()),
        (Some("setFlag"), Some("ann"))
    );
    assert_eq!(r.content.as_deref(), Some("{\"key\":\"k\",\"value\":2}"));
    assert_eq!(r.change_hash.as_deref(), Some(format!("{a}-2").as_bytes()));
    assert_eq!(
        (r.created_at, r.source_region.as_deref()),
        (at(2), Some("eu-west"))
    );
    // One run's events, a page at a time.
    let of_a = store.feed(start, Some(a), 1).await.unwrap();
    assert_eq!(of_a.len(), 1);
    let rest = store.feed(of_a[0].id, Some(a), 10).await.unwrap();
    assert_eq!(
        rest.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![all[2].id]
    );
    assert_eq!(store.event_run(all[1].id).await.unwrap(), Some(b));
    assert_eq!(store.event_run(all[3].id + 1000).await.unwrap(), None);
}

/// A batch as the group committer makes it: many runs interleaved, some events with every
/// optional column empty. Its cursors follow its order and empty columns stay empty.
async fn a_batch_keeps_its_order_and_its_empty_columns(store: &dyn Store) {
    let runs = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
    let start = store.last_event_id().await.unwrap();
    let batch: Vec<NewEvent> = (0..60)
        .map(|i| {
            let mut e = event(runs[i % 3], (i / 3 + 1) as i64, i as i64);
            if i % 2 == 1 {
                (e.payload, e.user_id, e.kind, e.content) = (None, None, None, None);
            }
            e
        })
        .collect();
    assert_eq!(store.append(&batch).await.unwrap(), 60);
    let stored = store.feed(start, None, 100).await.unwrap();
    let order = |run: Uuid, lamport: i64| (run, lamport);
    assert_eq!(
        stored
            .iter()
            .map(|r| order(r.run_id, r.lamport.unwrap()))
            .collect::<Vec<_>>(),
        batch
            .iter()
            .map(|e| order(e.run_id, e.lamport))
            .collect::<Vec<_>>(),
        "cursors follow the batch's order"
    );
    for (row, e) in stored.iter().zip(&batch) {
        assert_eq!(row.user_id, e.user_id);
        assert_eq!(row.kind, e.kind);
        assert_eq!(row.content, e.content);
    }
    let of_run = store.events_after(runs[0], 0).await.unwrap();
    assert_eq!(of_run.len(), 20);
    assert!(of_run.iter().all(|e| e.run_seq.is_some()));
    assert_eq!(of_run[0].payload.as_deref(), Some("{\"seq\":1}"));
    assert_eq!(of_run[1].payload, None, "an empty payload stays empty");
}

/// Appends from several committers at once: a reader following the cursor meets every event
/// (none commits below a cursor the reader already passed).
async fn concurrent_appends_never_commit_behind_a_reader(store: Arc<dyn Store>) {
    let start = store.last_event_id().await.unwrap();
    let writers: Vec<_> = (0..6)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let run = Uuid::new_v4();
                for seq in 1..=40 {
                    store.append(&[event(run, seq, seq)]).await.unwrap();
                }
            })
        })
        .collect();
    let (mut cursor, mut seen) = (start, 0);
    while seen < 240 {
        for row in store.feed(cursor, None, 7).await.unwrap() {
            assert!(row.id > cursor);
            cursor = row.id;
            seen += 1;
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(store.feed(cursor, None, 10).await.unwrap().len(), 0);
    assert_eq!(seen, 240, "every event met once");
}

fn webhook(id: &str, runs: Option<Vec<Uuid>>, kinds: Option<Vec<&str>>) -> Webhook {
    Webhook {
        id: id.into(),
        url: format!("http://127.0.0.1:9/{id}"),
        secret: "whsec_c2VjcmV0".into(),
        runs,
        kinds: kinds.map(|k| k.into_iter().map(str::to_string).collect()),
        origin: "api".into(),
        created_at: at(0),
    }
}

fn kinded(run: Uuid, seq: i64, kind: &str) -> NewEvent {
    NewEvent {
        kind: Some(kind.into()),
        ..event(run, seq, seq)
    }
}

/// The outbox is filled with the events it reports, per subscription and filter, delivered
/// in order per run, retried, dead-lettered and replayed.
async fn the_outbox_follows_the_log(store: &dyn Store) {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let before = kinded(a, 1, "graft");
    store.append(&[before]).await.unwrap();
    let (all, grafts_of_a) = (format!("all-{a}"), format!("a-{a}"));
    store
        .save_webhook(&webhook(&all, None, None))
        .await
        .unwrap();
    store
        .save_webhook(&webhook(&grafts_of_a, Some(vec![a]), Some(vec!["graft"])))
        .await
        .unwrap();
    let listed = store.webhooks().await.unwrap();
    let mine = listed.iter().find(|w| w.id == grafts_of_a).unwrap();
    assert_eq!(
        (mine.runs.clone(), mine.kinds.clone()),
        (Some(vec![a]), Some(vec!["graft".into()]))
    );
    store
        .append(&[
            kinded(a, 2, "graft"),
            kinded(a, 3, "setFlag"),
            kinded(b, 1, "graft"),
        ])
        .await
        .unwrap();
    let now = chrono::Utc::now().naive_utc() + chrono::Duration::seconds(1);
    let ours = |d: &Vec<run_store::Delivery>| -> Vec<(String, Uuid, i64)> {
        d.iter()
            .filter(|d| d.subscription_id == all || d.subscription_id == grafts_of_a)
            .map(|d| {
                (
                    d.subscription_id.clone(),
                    d.event.run_id,
                    d.event.lamport.unwrap() / 10,
                )
            })
            .collect()
    };
    // Only the oldest of each (subscription, run); the event before the subscriptions has none.
    let due = store.due_deliveries(now, 1000).await.unwrap();
    let mut got = ours(&due);
    got.sort();
    let mut want = vec![
        (all.clone(), a, 2),
        (all.clone(), b, 1),
        (grafts_of_a.clone(), a, 2),
    ];
    want.sort();
    assert_eq!(got, want);
    let first = due
        .iter()
        .find(|d| d.subscription_id == all && d.event.run_id == a)
        .unwrap();
    assert_eq!(first.event.kind.as_deref(), Some("graft"));
    store
        .attempted(first.id, &Attempted::Delivered)
        .await
        .unwrap();
    let next = store.due_deliveries(now, 1000).await.unwrap();
    let next = next
        .iter()
        .find(|d| d.subscription_id == all && d.event.run_id == a)
        .unwrap();
    assert_eq!(
        next.event.lamport,
        Some(30),
        "the run's next event, in order"
    );
    // A retry later is not due now; a last failure dead-letters.
    let later = now + chrono::Duration::seconds(60);
    let failed = |next| Attempted::Failed {
        error: "503".into(),
        next,
    };
    store
        .attempted(next.id, &failed(Some(later)))
        .await
        .unwrap();
    assert!(ours(&store.due_deliveries(now, 1000).await.unwrap())
        .iter()
        .all(|(s, r, _)| !(s == &all && *r == a)));
    store.attempted(next.id, &failed(None)).await.unwrap();
    let dead = store.dead_letters(&all, 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].attempts, dead[0].last_error.as_deref()),
        (2, Some("503"))
    );
    assert_eq!(store.replay_dead(&all, None, now).await.unwrap(), 1);
    assert!(store.dead_letters(&all, 0, 10).await.unwrap().is_empty());
    let again = store.due_deliveries(now, 1000).await.unwrap();
    assert!(again.iter().any(|d| d.id == next.id && d.attempts == 0));
    let (pending, _) = store.outbox_depth().await.unwrap();
    assert!(pending >= 3);
    assert!(store.delete_webhook(&all).await.unwrap());
    assert!(!store.delete_webhook(&all).await.unwrap());
    assert!(store
        .due_deliveries(now, 1000)
        .await
        .unwrap()
        .iter()
        .all(|d| d.subscription_id != all));
    store.delete_webhook(&grafts_of_a).await.unwrap();
}

fn joining(member: &str, pod: &str) -> Joining {
    Joining {
        member: member.into(),
        pod: pod.into(),
        region: "eu-west".into(),
        address: format!("http://{pod}:8080"),
    }
}

fn fenced(run: Uuid, seq: i64, fence: &Fence) -> NewEvent {
    NewEvent {
        fence: Some(fence.clone()),
        ..event(run, seq, seq)
    }
}

fn owned(claim: Claim) -> Fence {
    match claim {
        Claim::Owned(f) => f,
        Claim::Held(o) => panic!("expected to own the run, {o:?} holds it"),
    }
}

/// Two pods sharing one database: a run has one owner at a time, a deposed owner's writes are
/// refused by the database, and leases decide when a run may be taken. Returns the last
/// fenced write's run and epoch.
async fn one_owner_per_run(a: &dyn Store, b: &dyn Store) -> (Uuid, i64) {
    let (ma, mb): (Arc<str>, Arc<str>) = ("pod-0#1".into(), "pod-1#1".into());
    a.join(&joining(&ma, "pod-0"), 30.0).await.unwrap();
    b.join(&joining(&mb, "pod-1"), 1.0).await.unwrap();
    let (run, other_run) = (Uuid::new_v4(), Uuid::new_v4());

    let fa = owned(a.claim(run, &ma).await.unwrap());
    assert_eq!(
        b.claim(run, &mb).await.unwrap(),
        Claim::Held(Owner {
            member: ma.to_string(),
            address: "http://pod-0:8080".into()
        }),
        "a live owner keeps its run"
    );
    assert_eq!(a.append(&[fenced(run, 1, &fa)]).await.unwrap(), 1);
    let forged = Fence {
        member: mb.clone(),
        epoch: fa.epoch,
    };
    assert!(matches!(
        b.append(&[fenced(run, 2, &forged)]).await,
        Err(StoreError::Fenced(r)) if r == vec![run]
    ));

    // Handed over: the old owner's fence no longer writes, not even beside a run it owns.
    let fa_other = owned(a.claim(other_run, &ma).await.unwrap());
    a.release(run, &fa).await.unwrap();
    let fb = owned(b.claim(run, &mb).await.unwrap());
    assert!(fb.epoch > fa.epoch, "every claim raises the epoch");
    let mixed = [fenced(other_run, 1, &fa_other), fenced(run, 2, &fa)];
    assert!(matches!(a.append(&mixed).await, Err(StoreError::Fenced(r)) if r == vec![run]));
    assert_eq!(
        a.events_after(other_run, 0).await.unwrap().len(),
        0,
        "a refused write writes nothing"
    );
    let mut snap = snapshot(run, 1);
    snap.fence = Some(fa.clone());
    assert!(matches!(
        a.save_snapshot(&snap, 3).await,
        Err(StoreError::Fenced(_))
    ));
    assert_eq!(b.append(&[fenced(run, 2, &fb)]).await.unwrap(), 1);

    // b stops renewing: once its lease lapses, a may take the run, and b's fence is dead.
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    let fa2 = owned(a.claim(run, &ma).await.unwrap());
    assert!(fa2.epoch > fb.epoch);
    assert!(matches!(
        b.append(&[fenced(run, 3, &fb)]).await,
        Err(StoreError::Fenced(_))
    ));
    assert!(
        matches!(b.claim(other_run, &mb).await, Err(StoreError::LeaseLapsed)),
        "a member whose lease lapsed claims nothing"
    );
    assert!(!b.renew(&mb, 30.0).await.unwrap(), "its lease had lapsed");
    assert!(b.renew(&mb, 30.0).await.unwrap(), "renewed");

    // pod-0 restarts: the new member ends the old one's lease and may take its runs at once.
    let ma2: Arc<str> = "pod-0#2".into();
    a.join(&joining(&ma2, "pod-0"), 30.0).await.unwrap();
    let members = b.members().await.unwrap();
    let live: Vec<(&str, bool, i64)> = members
        .iter()
        .map(|m| (m.member.as_str(), m.live, m.runs))
        .collect();
    assert_eq!(
        live,
        vec![
            ("pod-0#1", false, 2),
            ("pod-0#2", true, 0),
            ("pod-1#1", true, 0)
        ]
    );
    let fb2 = owned(b.claim(other_run, &mb).await.unwrap());
    assert!(matches!(
        a.append(&[fenced(other_run, 1, &fa_other)]).await,
        Err(StoreError::Fenced(_))
    ));

    // A role (webhook delivery) is one member's while it lives.
    assert!(b.claim_role("webhooks", &mb).await.unwrap());
    assert!(b.claim_role("webhooks", &mb).await.unwrap(), "kept");
    assert!(
        !a.claim_role("webhooks", &ma2).await.unwrap(),
        "held by a live member"
    );
    b.release_role("webhooks", &mb).await.unwrap();
    assert!(a.claim_role("webhooks", &ma2).await.unwrap(), "released");
    a.release_role("webhooks", &ma2).await.unwrap();
    assert!(b.claim_role("webhooks", &mb).await.unwrap());

    // Leaving releases everything: the other member claims without waiting for a lease.
    b.leave(&mb).await.unwrap();
    assert!(
        a.claim_role("webhooks", &ma2).await.unwrap(),
        "released on leaving"
    );
    let f = owned(a.claim(other_run, &ma2).await.unwrap());
    assert!(f.epoch > fb2.epoch);
    assert_eq!(a.append(&[fenced(other_run, 1, &f)]).await.unwrap(), 1);
    a.leave(&ma2).await.unwrap();
    (other_run, f.epoch)
}

/// PostgreSQL: an append that waits for the append lock sees what committed while it waited.
/// Here a subscription saved by the lock's holder: the events must get their outbox row (a
/// statement reads the database as it stood when it began, so the lock is taken by a statement
/// of its own before the append's statement reads the subscriptions).
async fn an_append_waiting_for_the_lock_sees_what_committed_meanwhile(
    store: Arc<dyn Store>,
    url: &str,
) {
    use diesel_async::SimpleAsyncConnection;
    let mut holder = AsyncPgConnection::establish(url).await.expect("connects");
    holder
        .batch_execute("BEGIN; SELECT pg_advisory_xact_lock(7263010451);")
        .await
        .expect("holds the append lock");
    let run = Uuid::new_v4();
    let appending = {
        let store = store.clone();
        tokio::spawn(async move { store.append(&[event(run, 1, 1)]).await })
    };
    let mut watcher = AsyncPgConnection::establish(url).await.expect("connects");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: Vec<Number> = diesel::sql_query(
            "SELECT COUNT(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        )
        .load(&mut watcher)
        .await
        .expect("pg_locks");
        if waiting.as_slice().first().is_some_and(|c| c.n > 0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the append never waited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let hook = format!("waiting-{}", run.simple());
    holder
        .batch_execute(&format!(
            "INSERT INTO crdt_webhooks (id, url, secret, runs, kinds, origin, created_at) \
             VALUES ('{hook}', 'http://127.0.0.1:9/', 's', NULL, NULL, 'api', now()); COMMIT;"
        ))
        .await
        .expect("saves a subscription and lets go of the lock");
    assert_eq!(appending.await.expect("joins").expect("appends"), 1);
    let rows: Vec<Number> = diesel::sql_query(format!(
        "SELECT COUNT(*) AS n FROM crdt_webhook_outbox WHERE subscription_id = '{hook}'"
    ))
    .load(&mut watcher)
    .await
    .expect("outbox");
    assert_eq!(
        rows.as_slice().first().map(|c| c.n),
        Some(1),
        "the event lost its delivery to the subscription saved while it waited"
    );
    diesel::sql_query(format!(
        "DELETE FROM crdt_webhook_outbox WHERE subscription_id = '{hook}'"
    ))
    .execute(&mut watcher)
    .await
    .expect("cleans up");
    diesel::sql_query(format!("DELETE FROM crdt_webhooks WHERE id = '{hook}'"))
        .execute(&mut watcher)
        .await
        .expect("cleans up");
}

#[derive(diesel::QueryableByName)]
struct Number {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

async fn suite(store: Arc<dyn Store>, backend: &str) {
    assert_eq!(store.backend(), backend);
    store.ping().await.expect("the database answers");
    the_log_keeps_order_fields_and_drops_duplicates(store.as_ref()).await;
    snapshots_keep_the_newest_and_fall_back(store.as_ref()).await;
    runs_are_listed_by_id_and_by_activity(store.as_ref()).await;
    the_feed_reads_by_cursor_in_commit_order(store.as_ref()).await;
    a_batch_keeps_its_order_and_its_empty_columns(store.as_ref()).await;
    concurrent_appends_never_commit_behind_a_reader(store.clone()).await;
    the_outbox_follows_the_log(store.as_ref()).await;
    deletion_is_the_last_decision_and_the_purge_leaves_only_it(store.as_ref()).await;
}

#[tokio::test]
async fn sqlite_conforms() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("crdt.db").display());
    let store = run_store::open(&url, 2, true).await.expect("opens");
    suite(store, "sqlite").await;
}

#[tokio::test]
async fn postgres_conforms() {
    // As the node's other PostgreSQL tests: the local server unless told otherwise.
    let admin = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("crdt_conformance_{}", Uuid::new_v4().simple());
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    let url = format!("{base}/{name}");
    // Pods sharing a fresh database start at once: both migrate it, one after the other.
    let (store, twin) = tokio::join!(
        run_store::open(&url, 2, true),
        run_store::open(&url, 2, true)
    );
    let store =
        store.unwrap_or_else(|e| panic!("PostgreSQL at {base} is required for this test: {e}"));
    twin.expect("a second node migrating the same database at the same moment");
    suite(store.clone(), "postgres").await;
    an_append_waiting_for_the_lock_sees_what_committed_meanwhile(store.clone(), &url).await;
    // A second pod on the same database.
    let other = run_store::open(&url, 2, false).await.expect("opens again");
    let (run, epoch) = one_owner_per_run(store.as_ref(), other.as_ref()).await;
    // The fence's epoch is kept with the event (no `Store` method reads it back).
    let mut conn = AsyncPgConnection::establish(&url).await.expect("connects");
    let kept: Vec<Number> = diesel::sql_query(format!(
        "SELECT owner_epoch AS n FROM collaboration_events WHERE run_id = '{run}' AND run_seq = 1"
    ))
    .load(&mut conn)
    .await
    .expect("reads the epoch");
    assert_eq!(kept.as_slice().first().map(|c| c.n), Some(epoch));
    drop(conn);
    drop((store, other));
    let mut conn = AsyncPgConnection::establish(&admin).await.expect("admin");
    let drop_db = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
    diesel::sql_query(drop_db)
        .execute(&mut conn)
        .await
        .expect("dropped");
}
