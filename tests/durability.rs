//! Durability and recovery against real node processes: restarts, SIGKILL under concurrent
//! writes, snapshots plus tail, snapshot retention, torn snapshots.

use test_support as common;
use test_support::both_backends;

use std::collections::HashSet;

use common::{db, run_url, Backend, Client, Node, TestDb};
use serde_json::{json, Value};
use uuid::Uuid;

async fn state(c: &Client, node: &Node, run: Uuid) -> Value {
    let (s, body) = c.get(&run_url(node, run, "/state")).await;
    assert_eq!(s, 200, "{body}");
    body
}

async fn flag(c: &Client, node: &Node, run: Uuid, key: &str, value: Value) -> Value {
    let (s, body) = c
        .put(
            &run_url(node, run, &format!("/flags/{key}")),
            &json!({"value": value, "user": "u"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    body
}

/// Waits until the run's newest snapshot covers `position` events; returns every position.
async fn snapshots_reaching(db: &TestDb, run: Uuid, position: i32) -> Vec<i32> {
    common::eventually(10, || async move {
        let p = db::snapshot_positions(db, run).await;
        (p.first() == Some(&position)).then_some(p)
    })
    .await
    .unwrap_or_else(|| panic!("no snapshot at {position} events"))
}

async fn restart_serves_identical_state_and_continues_the_clock(backend: Backend) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let mut node = Node::spawn(&db, &[]);
    c.post(
        &run_url(&node, run, "/grafts"),
        &json!({"agent": "A", "afterStep": "S1", "user": "u"}),
    )
    .await;
    c.post(
        &run_url(&node, run, "/pruned-steps"),
        &json!({"stepId": "S2", "user": "u"}),
    )
    .await;
    flag(&c, &node, run, "k", json!({"x": [1, 2, 3]})).await;
    let before = state(&c, &node, run).await;
    node.kill();

    let node = Node::spawn(&db, &[]);
    let after = state(&c, &node, run).await;
    assert_eq!(
        before, after,
        "identical state, heads and clock after a restart"
    );
    let (_, g) = c
        .post(
            &run_url(&node, run, "/grafts"),
            &json!({"agent": "B", "afterStep": "S1", "user": "u"}),
        )
        .await;
    assert_eq!(g["lamport"], 4, "the Lamport clock continues");
    // The new incarnation writes under a new actor id: its change is stored, not deduplicated away.
    assert_eq!(db::event_rows(&db, run).await, 4);
}

/// A run of 250 events with snapshots every 100: the newest snapshot covers 200 events and
/// loading reads it plus only the 50 events after it.
async fn snapshot_plus_tail(backend: Backend) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let env = [
        ("CRDT_SNAPSHOT_EVERY", "100"),
        ("CRDT_SNAPSHOT_MIN_INTERVAL_MS", "0"),
    ];
    let mut node = Node::spawn(&db, &env);
    // Pausing at each hundred lets each snapshot cover exactly the events written so far.
    for i in 0..250 {
        flag(&c, &node, run, &format!("k{}", i % 40), json!(i)).await;
        if (i + 1) % 100 == 0 {
            snapshots_reaching(&db, run, i + 1).await;
        }
    }
    let before = state(&c, &node, run).await;
    assert_eq!(db::snapshot_positions(&db, run).await, vec![200, 100]);
    node.kill();

    // Delete the events the snapshot covers: if loading still gives the whole state, it read
    // the snapshot and the tail, not the whole log.
    let removed = db::execute(
        &db,
        &format!(
            "DELETE FROM collaboration_events WHERE run_id = {} AND run_seq <= 200",
            db::run_literal(&db, run)
        ),
    )
    .await;
    assert_eq!(removed, 200);
    assert_eq!(db::event_rows(&db, run).await, 50);
    let node = Node::spawn(&db, &env);
    let after = state(&c, &node, run).await;
    assert_eq!(before, after);
    assert_eq!(after["lamport"], 250);
    let next = flag(&c, &node, run, "after-restart", json!(true)).await;
    assert_eq!(next["lamport"], 251);
}

/// Past ten times `every-events`, a run is snapshotted every tenth of its length: written one
/// at a time, and waiting at each snapshot due, a run of 300 events holds snapshots exactly at
/// 10, 20, … 100, then 110, 121, 133, … (each a tenth past the last), and none between.
async fn a_long_run_is_snapshotted_every_tenth_of_its_length(backend: Backend) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let env = [
        ("CRDT_SNAPSHOT_EVERY", "10"),
        ("CRDT_SNAPSHOT_KEEP", "1000"),
        ("CRDT_SNAPSHOT_MIN_INTERVAL_MS", "0"),
    ];
    let node = Node::spawn(&db, &env);
    let mut expected = Vec::new();
    let mut due = 10;
    for i in 1..=300 {
        flag(&c, &node, run, &format!("k{}", i % 40), json!(i)).await;
        if i == due {
            snapshots_reaching(&db, run, i).await;
            expected.insert(0, i);
            // The snapshot actor counts a snapshot just before telling the run of it: once
            // counted, the run hears of it before the next write.
            let written = expected.len() as f64;
            common::eventually(10, || async {
                let text = c.text(&node.url("/actuator/prometheus")).await;
                let (memory, storage) = common::snapshots_written(&text);
                (memory + storage >= written).then_some(())
            })
            .await
            .expect("the snapshot counted");
            due = i + (i / 10).max(10);
        }
    }
    assert_eq!(
        expected[..4],
        [281, 256, 233, 212],
        "the spacing this test expects"
    );
    assert_eq!(db::snapshot_positions(&db, run).await, expected);
}

async fn snapshots_keep_the_newest(backend: Backend) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let env = [
        ("CRDT_SNAPSHOT_EVERY", "5"),
        ("CRDT_SNAPSHOT_KEEP", "3"),
        ("CRDT_SNAPSHOT_MIN_INTERVAL_MS", "0"),
    ];
    let node = Node::spawn(&db, &env);
    for i in 0..40 {
        flag(&c, &node, run, "k", json!(i)).await;
        if (i + 1) % 5 == 0 {
            snapshots_reaching(&db, run, i + 1).await;
        }
    }
    assert_eq!(db::snapshot_positions(&db, run).await, vec![40, 35, 30]);
}

/// A hot run is snapshotted at most once per minimum interval, and the snapshot it is due comes
/// when the interval ends, even if no more writes arrive.
async fn hot_runs_are_snapshotted_at_most_once_per_interval(backend: Backend) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let env = [
        ("CRDT_SNAPSHOT_EVERY", "5"),
        ("CRDT_SNAPSHOT_MIN_INTERVAL_MS", "1500"),
    ];
    let node = Node::spawn(&db, &env);
    let started = std::time::Instant::now();
    for i in 0..40 {
        flag(&c, &node, run, "k", json!(i)).await;
    }
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1500),
        "the writes were too slow to test this"
    );
    let first = db::snapshot_positions(&db, run).await;
    assert!(
        first.len() <= 1,
        "one snapshot per interval, not one per 5 events: {first:?}"
    );
    // The deferred snapshot arrives after the interval and covers everything.
    assert_eq!(snapshots_reaching(&db, run, 40).await.first(), Some(&40));
}

/// A torn or corrupt newest snapshot is skipped; the run is rebuilt from its log.
async fn corrupt_snapshot_falls_back_to_the_log(backend: Backend) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let mut node = Node::spawn(&db, &[("CRDT_SNAPSHOT_EVERY", "10")]);
    for i in 0..15 {
        flag(&c, &node, run, &format!("k{i}"), json!(i)).await;
    }
    let before = state(&c, &node, run).await;
    common::eventually(10, || {
        let db = &db;
        async move { (!db::snapshot_positions(db, run).await.is_empty()).then_some(()) }
    })
    .await
    .expect("a snapshot");
    node.kill();
    let torn = db::torn_snapshot_data(&db);
    db::execute(
        &db,
        &format!("UPDATE crdt_snapshots SET snapshot_data = {torn}"),
    )
    .await;
    let node = Node::spawn(&db, &[("CRDT_SNAPSHOT_EVERY", "10")]);
    assert_eq!(state(&c, &node, run).await, before);
    assert!(
        node.log_text().contains("does not load"),
        "the fallback is logged"
    );
}

/// 32 clients write to 8 runs while the node is killed with SIGKILL: after a restart, every
/// acknowledged mutation is present.
async fn acknowledged_writes_survive_sigkill(backend: Backend) {
    let db = TestDb::new(backend).await;
    let runs: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();
    let mut node = Node::spawn(&db, &[("CRDT_SNAPSHOT_EVERY", "25")]);
    let base = node.base.clone();
    let mut tasks = Vec::new();
    for client in 0..32 {
        let base = base.clone();
        let run = runs[client % runs.len()];
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut acked = Vec::new();
            for i in 0.. {
                let agent = format!("c{client}-{i}");
                let url = format!("{base}/api/crdt/runs/{run}/grafts");
                let body = json!({"agent": agent, "afterStep": "S", "user": format!("c{client}")});
                match http.post(&url).json(&body).send().await {
                    Ok(r) if r.status().as_u16() == 201 => acked.push((run, agent)),
                    _ => break, // the node is gone
                }
            }
            acked
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    node.kill();
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert!(
        acked.len() > 100,
        "only {} writes were acknowledged before the kill",
        acked.len()
    );

    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let mut present = HashSet::new();
    for run in &runs {
        let st = state(&c, &node, *run).await;
        for g in st["grafts"].as_array().unwrap() {
            present.insert((*run, g["agent"].as_str().unwrap().to_string()));
        }
    }
    let lost: Vec<_> = acked.iter().filter(|a| !present.contains(a)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged grafts lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
}

/// While the database refuses writes, mutations get 503 and are never acknowledged; the run
/// serves its durable state; when writes work again everything resumes, and after a restart
/// the refused mutation is nowhere.
async fn refused_writes_are_never_acknowledged_or_resurrected(backend: Backend) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let env = [("CRDT_SNAPSHOT_EVERY", "2")];
    let mut node = Node::spawn(&db, &env);
    let graft = |agent: &str| json!({"agent": agent, "afterStep": "S", "user": "u"});
    for agent in ["before-1", "before-2", "before-3"] {
        let (s, _) = c.post(&run_url(&node, run, "/grafts"), &graft(agent)).await;
        assert_eq!(s, 201);
    }
    match backend {
        Backend::Postgres => {
            db::on_insert(&db, "refuse", "RAISE EXCEPTION 'injected fault';").await
        }
        Backend::Sqlite => {
            let refuse = "CREATE TRIGGER refuse BEFORE INSERT ON collaboration_events \
                          BEGIN SELECT RAISE(ABORT, 'injected fault'); END";
            db::execute(&db, refuse).await;
        }
    }
    let (s, err) = c
        .post(&run_url(&node, run, "/grafts"), &graft("refused"))
        .await;
    assert_eq!(s, 503, "{err}");
    assert_eq!(err["error"], "unavailable");
    let (s, err) = c
        .put(
            &run_url(&node, run, "/flags/f"),
            &json!({"value": 1, "user": "u"}),
        )
        .await;
    assert_eq!(s, 503, "{err}");
    let st = state(&c, &node, run).await;
    let agents = common::agents(&st);
    assert_eq!(
        agents,
        vec!["before-1", "before-2", "before-3"],
        "reads serve the durable state"
    );
    assert_eq!(st["flags"], json!({}));

    db::drop_on_insert(&db, "refuse").await;
    let (s, _) = c
        .post(&run_url(&node, run, "/grafts"), &graft("after"))
        .await;
    assert_eq!(s, 201);
    node.kill();
    let node = Node::spawn(&db, &env);
    let st = state(&c, &node, run).await;
    let agents = common::agents(&st);
    assert_eq!(agents, vec!["before-1", "before-2", "before-3", "after"]);
    assert_eq!(st["flags"], json!({}));
    assert_eq!(db::event_rows(&db, run).await, 4);
}

async fn a_retried_graft_is_stored_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let node = Node::spawn(&db, &[]);
    let id = Uuid::new_v4();
    let body = json!({"id": id, "agent": "A", "afterStep": "S", "user": "u"});
    let (s1, first) = c.post(&run_url(&node, run, "/grafts"), &body).await;
    let (s2, again) = c.post(&run_url(&node, run, "/grafts"), &body).await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(first["graft"], again["graft"]);
    assert_eq!(first["graft"]["id"], json!(id));
    assert_eq!(again["changed"], false);
    assert_eq!(db::event_rows(&db, run).await, 1);
}

/// 64 clients writing at once to 64 runs: every write is acknowledged and stored, and
/// transactions carry several appends (group commit), as the batch histogram shows. The
/// committer's time histograms count every append's wait and every transaction.
async fn concurrent_writes_share_transactions(backend: Backend) {
    let db = TestDb::new(backend).await;
    let node = Node::spawn(&db, &[]);
    let runs: Vec<Uuid> = (0..64).map(|_| Uuid::new_v4()).collect();
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for run in runs.clone() {
        let url = run_url(&node, run, "/flags/n");
        tasks.push(tokio::spawn(async move {
            let c = Client::new();
            for i in 0..20 {
                let (s, body) = c.put(&url, &json!({"value": i, "user": "u"})).await;
                assert_eq!(s, 200, "{body}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let writing = started.elapsed();
    for run in &runs {
        assert_eq!(db::event_rows(&db, *run).await, 20);
    }
    let text = Client::new().text(&node.url("/actuator/prometheus")).await;
    let single = common::metric(&text, "crdt_commit_batch_appends_bucket{le=\"1\"}").unwrap();
    let transactions = common::metric(&text, "crdt_commit_batch_appends_count").unwrap();
    let appends = common::metric(&text, "crdt_commit_batch_appends_sum").unwrap();
    assert_eq!(
        appends,
        64.0 * 20.0,
        "every append went through the group committer"
    );
    assert!(
        transactions < appends,
        "{transactions} transactions for {appends} appends"
    );
    assert!(
        single < transactions,
        "some transaction carried more than one append"
    );
    let metric = |name: &str| common::metric(&text, name).unwrap_or(f64::NAN);
    assert_eq!(
        metric("crdt_commit_wait_seconds_count"),
        appends,
        "every append's wait is observed"
    );
    assert_eq!(
        metric("crdt_commit_duration_seconds_count"),
        transactions,
        "every transaction's duration is observed"
    );
    // One committer runs the transactions one after another, all while the clients wrote:
    // together they took no longer than the writing did.
    let took = metric("crdt_commit_duration_seconds_sum");
    assert!(
        took <= writing.as_secs_f64(),
        "transactions took {took} s in all, within {writing:?} of writing"
    );
}

/// The scrape reports SQLite's WAL pages not yet copied back: some while a reader holds an old
/// snapshot of the node's database, none once it lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_back_wal_shows_in_the_metrics() {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let run = Uuid::new_v4();
    flag(&c, &node, run, "first", json!(0)).await;
    let path = db.url.strip_prefix("sqlite://").expect("a SQLite URL");
    let mut reader = diesel::SqliteConnection::establish(path).expect("open the node's database");
    reader
        .batch_execute(
            "PRAGMA busy_timeout = 5000; BEGIN; SELECT COUNT(*) FROM collaboration_events;",
        )
        .expect("read");
    for i in 0..20 {
        flag(&c, &node, run, &format!("k{i}"), json!(i)).await;
    }
    let backlog = || async {
        let text = Client::new().text(&node.url("/actuator/prometheus")).await;
        common::metric(&text, "crdt_sqlite_wal_backlog_pages")
    };
    // The checkpoint after the last write runs within 10 ms and leaves what the reader needs.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let held = backlog().await;
    assert!(held.is_some_and(|pages| pages > 0.0), "held back: {held:?}");
    reader.batch_execute("COMMIT;").expect("end the read");
    let copied = common::eventually(10, || async {
        (backlog().await == Some(0.0)).then_some(())
    });
    assert!(
        copied.await.is_some(),
        "10 s after the reader let go, the backlog is {:?}",
        backlog().await
    );
}

/// A run loaded with more events than the snapshot interval since its last snapshot gets one
/// at once, and that snapshot holds the whole run: loading from it alone gives the same state.
async fn a_snapshot_taken_right_after_loading_is_complete(backend: Backend) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let mut node = Node::spawn(&db, &[("CRDT_SNAPSHOT_EVERY", "1000")]);
    for i in 0..30 {
        flag(&c, &node, run, &format!("k{i}"), json!(i)).await;
    }
    let before = state(&c, &node, run).await;
    node.kill();
    assert!(db::snapshot_positions(&db, run).await.is_empty());

    let mut node = Node::spawn(&db, &[("CRDT_SNAPSHOT_EVERY", "10")]);
    assert_eq!(state(&c, &node, run).await, before);
    assert_eq!(snapshots_reaching(&db, run, 30).await, vec![30]);
    assert_eq!(
        db::snapshot_lamports(&db, run).await,
        vec![30],
        "the snapshot records the clock"
    );
    node.kill();
    // Only the snapshot is left to load from.
    db::execute(
        &db,
        &format!(
            "DELETE FROM collaboration_events WHERE run_id = {}",
            db::run_literal(&db, run)
        ),
    )
    .await;
    let node = Node::spawn(&db, &[]);
    assert_eq!(state(&c, &node, run).await, before);
    assert!(
        !node.log_text().contains("does not load"),
        "{}",
        node.log_text()
    );
}

/// A corrupt newest snapshot is passed over for the one before it (not for the whole log).
async fn a_corrupt_newest_snapshot_falls_back_to_the_previous_one(backend: Backend) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let env = [
        ("CRDT_SNAPSHOT_EVERY", "10"),
        ("CRDT_SNAPSHOT_MIN_INTERVAL_MS", "0"),
    ];
    let mut node = Node::spawn(&db, &env);
    for i in 0..25 {
        flag(&c, &node, run, &format!("k{i}"), json!(i)).await;
        if (i + 1) % 10 == 0 {
            snapshots_reaching(&db, run, i + 1).await;
        }
    }
    let before = state(&c, &node, run).await;
    node.kill();
    let torn = db::torn_snapshot_data(&db);
    let literal = db::run_literal(&db, run);
    db::execute(
        &db,
        &format!("UPDATE crdt_snapshots SET snapshot_data = {torn} WHERE event_count = 20"),
    )
    .await;
    // Without the events the older snapshot covers, only that snapshot can give the state.
    db::execute(
        &db,
        &format!("DELETE FROM collaboration_events WHERE run_id = {literal} AND run_seq <= 10"),
    )
    .await;
    let node = Node::spawn(&db, &env);
    assert_eq!(state(&c, &node, run).await, before);
    assert!(
        node.log_text().contains("trying an older one"),
        "{}",
        node.log_text()
    );
}

/// A read that arrives while a write is being committed answers once that write is durable,
/// and if the write is refused, the read is refused too: no reply ever shows a change that
/// may yet vanish. (PostgreSQL only: the test slows commits down with a trigger.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_wait_until_what_they_show_is_durable() {
    let db = TestDb::new(Backend::Postgres).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let node = Node::spawn(&db, &[]);
    let graft = |agent: &str| json!({"agent": agent, "afterStep": "S", "user": "u"});
    let (s, _) = c
        .post(&run_url(&node, run, "/grafts"), &graft("first"))
        .await;
    assert_eq!(s, 201);

    db::on_insert(&db, "slow", "PERFORM pg_sleep(1); RETURN NULL;").await;
    let writer = {
        let (c, url) = (c.clone(), run_url(&node, run, "/grafts"));
        tokio::spawn(async move { c.post(&url, &graft("slow")).await.0 })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let asked = std::time::Instant::now();
    let st = state(&c, &node, run).await;
    assert!(
        asked.elapsed() >= std::time::Duration::from_millis(400),
        "answered before the write was durable"
    );
    assert_eq!(common::agents(&st), vec!["first", "slow"]);
    assert_eq!(writer.await.unwrap(), 201);
    db::drop_on_insert(&db, "slow").await;

    db::on_insert(
        &db,
        "doomed",
        "PERFORM pg_sleep(1); RAISE EXCEPTION 'injected';",
    )
    .await;
    let writer = {
        let (c, url) = (c.clone(), run_url(&node, run, "/grafts"));
        tokio::spawn(async move { c.post(&url, &graft("doomed")).await.0 })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (state_url, changes_url) = (
        run_url(&node, run, "/state"),
        run_url(&node, run, "/changes"),
    );
    let ((state_status, _), (changes_status, _)) =
        tokio::join!(c.get(&state_url), c.get(&changes_url));
    assert_eq!(writer.await.unwrap(), 503);
    db::drop_on_insert(&db, "doomed").await;
    assert_eq!(
        state_status, 503,
        "a state that showed the refused write must not be served"
    );
    assert_eq!(
        changes_status, 503,
        "a refused change must not be handed to another replica"
    );
    let st = state(&c, &node, run).await;
    assert_eq!(common::agents(&st), vec!["first", "slow"]);
}

/// Another writer took the next log position of a run: the write that clashes is refused (never
/// acknowledged and silently skipped), and the run, reloaded, carries on after it.
async fn a_clash_on_the_log_position_is_refused_not_skipped(backend: Backend) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let node = Node::spawn(&db, &[]);
    flag(&c, &node, run, "a", json!(1)).await;
    flag(&c, &node, run, "b", json!(2)).await;
    let literal = db::run_literal(&db, run);
    let other_hash = match backend {
        Backend::Postgres => "'\\x00'::bytea",
        Backend::Sqlite => "X'00'",
    };
    db::execute(
        &db,
        &format!(
            "INSERT INTO collaboration_events (run_id, event_type, created_at, crdt_changes, source_region, lamport_timestamp, run_seq, change_hash) \
             SELECT run_id, 'OTHER_WRITER', created_at, crdt_changes, source_region, lamport_timestamp, 3, {other_hash} \
             FROM collaboration_events WHERE run_id = {literal} AND run_seq = 1"
        ),
    )
    .await;
    let (s, err) = c
        .put(
            &run_url(&node, run, "/flags/clash"),
            &json!({"value": 3, "user": "u"}),
        )
        .await;
    assert_eq!(s, 503, "{err}");
    let (s, _) = c
        .put(
            &run_url(&node, run, "/flags/after"),
            &json!({"value": 4, "user": "u"}),
        )
        .await;
    assert_eq!(s, 200);
    let st = state(&c, &node, run).await;
    assert_eq!(st["flags"], json!({"a": 1, "b": 2, "after": 4}));
    assert_eq!(db::event_rows(&db, run).await, 4);
}

/// A sync's timestamp hint above every stamp it carries advances the clock, and the clock is
/// still there after a restart.
async fn a_clock_advanced_by_a_sync_hint_survives_restart(backend: Backend) {
    use base64::Engine;
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let mut node = Node::spawn(&db, &[]);
    let mut eu = run_doc::RunDoc::new(run, "eu-central-1");
    let change = eu
        .apply(
            &run_doc::Mutation::SetFlag {
                key: "k".into(),
                value: json!(1),
            },
            0,
        )
        .unwrap()
        .change
        .unwrap();
    let body = json!({
        "changes": base64::engine::general_purpose::STANDARD.encode(change.raw_bytes()),
        "sourceRegion": "eu-central-1",
        "lamportTimestamp": 500,
    });
    let (s, out) = c.post(&run_url(&node, run, "/sync"), &body).await;
    assert_eq!((s, out["lamport"].as_u64()), (200, Some(500)), "{out}");
    node.kill();
    let node = Node::spawn(&db, &[]);
    assert_eq!(state(&c, &node, run).await["lamport"], 500);
    assert_eq!(flag(&c, &node, run, "next", json!(2)).await["lamport"], 501);
}

/// Every snapshot holds exactly the log up to its event count, while sixteen clients write at
/// once (so the run mostly has writes on their way to the log when a snapshot falls due, and
/// its copy is handed over only once they commit): a copy handed over before a write it holds
/// committed would hold a change the log gained only later, or never. Snapshots are saved from
/// memory; one whose writes take over half a second to commit would be built from storage.
async fn snapshots_hold_exactly_the_log_up_to_their_count(backend: Backend) {
    let (memory, storage) = snapshots_of_concurrent_writes(backend, "20000").await;
    assert!(
        memory > 0.0,
        "no snapshot was saved from memory ({storage} from storage)"
    );
}

/// The same with copies turned off (`copy-max-changes` 0): every snapshot is rebuilt from the
/// log, and holds exactly it too.
async fn snapshots_rebuilt_from_storage_hold_exactly_the_log_too(backend: Backend) {
    let (memory, storage) = snapshots_of_concurrent_writes(backend, "0").await;
    assert_eq!(memory, 0.0);
    assert!(storage > 0.0);
}

/// Sixteen clients write 640 flags at once, with a snapshot due every 10 events (every tenth of
/// the run past 100); checks every stored snapshot against the log and returns how many were
/// saved (from memory, from storage).
async fn snapshots_of_concurrent_writes(backend: Backend, copy_max_changes: &str) -> (f64, f64) {
    let db = TestDb::new(backend).await;
    let env = [
        ("CRDT_SNAPSHOT_EVERY", "10"),
        ("CRDT_SNAPSHOT_MIN_INTERVAL_MS", "0"),
        ("CRDT_SNAPSHOT_KEEP", "1000"),
        ("CRDT_SNAPSHOT_COPY_MAX_CHANGES", copy_max_changes),
    ];
    let node = Node::spawn(&db, &env);
    let run = Uuid::new_v4();
    const WRITERS: usize = 16;
    const EACH: usize = 40;
    let writers = (0..WRITERS).map(|w| {
        let node = &node;
        async move {
            let c = Client::new();
            for i in 0..EACH {
                flag(&c, node, run, &format!("w{w}-{i}"), json!(i)).await;
            }
        }
    });
    futures_util::future::join_all(writers).await;
    a_snapshot_near_the_end(&db, run, (WRITERS * EACH) as i32).await;

    // The metrics first, then the table: a snapshot is counted after it is stored, so one
    // still being saved makes the table hold one more, never fewer; once they agree, every
    // snapshot the node counted was checked.
    let counted_and_stored = || async {
        let text = Client::new().text(&node.url("/actuator/prometheus")).await;
        let (memory, storage) = common::snapshots_written(&text);
        let (logged, checked) = snapshots_match_the_log(&db, run).await;
        (logged, checked, memory, storage, text)
    };
    let agreed = common::eventually(10, || async {
        let (logged, checked, memory, storage, _) = counted_and_stored().await;
        (memory + storage == checked as f64).then_some((logged, checked, memory, storage))
    })
    .await;
    let Some((logged, checked, memory, storage)) = agreed else {
        let (_, checked, memory, storage, text) = counted_and_stored().await;
        panic!("the snapshots counted ({memory} + {storage}) never matched the {checked} stored:\n{text}");
    };
    assert_eq!(logged, WRITERS * EACH);
    assert!(checked >= 3, "only {checked} snapshots");
    (memory, storage)
}

/// Waits for the snapshot due at the end of a run of `total` events, written after the last
/// answer: past ten times `every-events` one is due every tenth of the run, so the last covers
/// more than ten elevenths of the log.
async fn a_snapshot_near_the_end(db: &TestDb, run: Uuid, total: i32) {
    common::eventually(10, || async {
        let p = db::snapshot_positions(db, run).await;
        (p.first().is_some_and(|n| n * 11 > total * 10)).then_some(())
    })
    .await
    .expect("a snapshot near the end of the log");
}

/// Checks that every stored snapshot of `run` holds exactly the logged changes up to its event
/// count; returns how many events are logged and how many snapshots were checked.
async fn snapshots_match_the_log(db: &TestDb, run: Uuid) -> (usize, usize) {
    let store = run_store::open(&db.url, 2, false).await.expect("store");
    let mut by_seq = std::collections::BTreeMap::new();
    for e in store.events_after(run, 0).await.expect("events") {
        let changes = run_doc::parse_own_changes(&e.crdt_changes.expect("changes")).unwrap();
        let seq = e.run_seq.expect("a sequence number");
        by_seq.insert(seq, changes.iter().map(|c| c.hash()).collect::<Vec<_>>());
    }
    let genesis = run_doc::RunDoc::new(run, "us-east-1").heads();
    let (mut below, mut checked) = (None, 0);
    while let Some(snapshot) = store.latest_snapshot(run, below).await.expect("snapshot") {
        let doc = automerge::Automerge::load(&snapshot.data).expect("a snapshot loads");
        let held: HashSet<automerge::ChangeHash> =
            doc.get_changes(&[]).iter().map(|c| c.hash()).collect();
        let logged: HashSet<automerge::ChangeHash> = by_seq
            .range(..=i64::from(snapshot.event_count))
            .flat_map(|(_, hashes)| hashes.iter().copied())
            .chain(genesis.iter().copied())
            .collect();
        assert!(
            held == logged,
            "the snapshot at {} holds {} changes the log lacks there and lacks {} it has",
            snapshot.event_count,
            held.difference(&logged).count(),
            logged.difference(&held).count()
        );
        below = Some(snapshot.event_count);
        checked += 1;
    }
    (by_seq.len(), checked)
}

/// A copy taken for a snapshot while writes were on their way holds those writes; if the log
/// refuses them (the run rolls back to what is stored) the copy must never be saved, even once
/// later writes carry the log past its position again. Eight clients write at once with a
/// snapshot due every 2 events, and the database refuses every write of a flag named
/// `poison…` (with the writes sharing its append); every stored snapshot must hold exactly
/// the log up to its count. (A refusal by the database fails the run, which drops its copy
/// with it; the outage test below covers a run that rolls back instead.)
async fn a_copy_holding_refused_writes_is_never_saved(backend: Backend) {
    let db = TestDb::new(backend).await;
    let env = [
        ("CRDT_SNAPSHOT_EVERY", "2"),
        ("CRDT_SNAPSHOT_MIN_INTERVAL_MS", "0"),
        ("CRDT_SNAPSHOT_KEEP", "1000"),
    ];
    let node = Node::spawn(&db, &env);
    let run = Uuid::new_v4();
    // The first write creates the run (its row is not refused).
    flag(&Client::new(), &node, run, "start", json!(0)).await;
    match backend {
        Backend::Postgres => {
            db::execute(
                &db,
                "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN \
                 IF NEW.event_content LIKE '%poison%' THEN RAISE EXCEPTION 'injected fault'; \
                 END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
            )
            .await;
            db::execute(
                &db,
                "CREATE TRIGGER poison BEFORE INSERT ON collaboration_events \
                 FOR EACH ROW EXECUTE FUNCTION poison()",
            )
            .await;
        }
        Backend::Sqlite => {
            db::execute(
                &db,
                "CREATE TRIGGER poison BEFORE INSERT ON collaboration_events \
                 WHEN NEW.event_content LIKE '%poison%' \
                 BEGIN SELECT RAISE(ABORT, 'injected fault'); END",
            )
            .await;
        }
    }
    let writers = (0..8).map(|w| {
        let node = &node;
        async move {
            let c = Client::new();
            let mut refused = 0;
            for i in 0..30 {
                let key = if i % 7 == 3 {
                    format!("poison-{w}-{i}")
                } else {
                    format!("w{w}-{i}")
                };
                let (s, body) = c
                    .put(
                        &run_url(node, run, &format!("/flags/{key}")),
                        &json!({"value": i, "user": "u"}),
                    )
                    .await;
                assert!(s == 200 || s == 503, "{s} {body}");
                refused += usize::from(s == 503);
            }
            refused
        }
    });
    let refused: usize = futures_util::future::join_all(writers).await.iter().sum();
    assert!(
        refused >= 8 * 4,
        "every poisoned write is refused: {refused}"
    );
    let st = state(&Client::new(), &node, run).await;
    let flags = st["flags"].as_object().expect("flags").clone();
    assert!(flags.keys().all(|k| !k.starts_with("poison")), "{st}");
    a_snapshot_near_the_end(&db, run, flags.len() as i32).await;
    let (logged, checked) = snapshots_match_the_log(&db, run).await;
    assert_eq!(logged, flags.len(), "one event per flag acknowledged");
    assert!(checked >= 3, "only {checked} snapshots");
}

both_backends!(
    snapshots_hold_exactly_the_log_up_to_their_count,
    snapshots_rebuilt_from_storage_hold_exactly_the_log_too,
    a_copy_holding_refused_writes_is_never_saved,
    a_cold_run_answers_from_its_projection_while_it_loads,
    sigterm_snapshots_dirty_runs_and_exits_cleanly,
    a_clock_advanced_by_a_sync_hint_survives_restart,
    a_clash_on_the_log_position_is_refused_not_skipped,
    a_corrupt_newest_snapshot_falls_back_to_the_previous_one,
    hot_runs_are_snapshotted_at_most_once_per_interval,
    a_snapshot_taken_right_after_loading_is_complete,
    concurrent_writes_share_transactions,
    refused_writes_are_never_acknowledged_or_resurrected,
    a_retried_graft_is_stored_once,
    restart_serves_identical_state_and_continues_the_clock,
    snapshot_plus_tail,
    a_long_run_is_snapshotted_every_tenth_of_its_length,
    snapshots_keep_the_newest,
    corrupt_snapshot_falls_back_to_the_log,
    acknowledged_writes_survive_sigkill,
    oversized_mutations_are_refused_and_everything_acknowledged_loads_after_sigkill,
    a_stored_change_that_does_not_load_is_reported_and_the_log_kept,
);

/// The issue-18 loss: a flag of 150,000 values was acknowledged, then refused by the node's own
/// loader after a restart, taking later writes with it. Now the door refuses it (413) before
/// anything is applied, values at the limit are acknowledged, and after SIGKILL every
/// acknowledged write is back.
async fn oversized_mutations_are_refused_and_everything_acknowledged_loads_after_sigkill(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let mut node = Node::spawn(&db, &[]);
    let put = |key: &str, value: Value| {
        let url = run_url(&node, run, &format!("/flags/{key}"));
        let c = &c;
        async move { c.put(&url, &json!({"value": value, "user": "u"})).await }
    };
    let (s, body) = put("big", json!(vec![0; 150_000])).await;
    assert_eq!(s, 413, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("values"),
        "{body}"
    );
    let (s, body) = put("text", json!("x".repeat(300 * 1024))).await;
    assert_eq!(s, 413, "{body}");
    assert_eq!(db::event_rows(&db, run).await, 0, "nothing of them stored");
    let (s, body) = put(
        "at-limit",
        json!(vec![7; run_doc::rules::MAX_FLAG_VALUES - 1]),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    for i in 0..6 {
        let (s, _) = c
            .post(
                &run_url(&node, run, "/grafts"),
                &json!({"agent": format!("A{i}"), "afterStep": "S1", "user": "u"}),
            )
            .await;
        assert_eq!(s, 201);
    }
    let (s, body) = put("after", json!({"ok": true})).await;
    assert_eq!(s, 200, "{body}");
    let before = state(&c, &node, run).await;
    node.kill();

    let node = Node::spawn(&db, &[]);
    let after = state(&c, &node, run).await;
    assert_eq!(before, after, "every acknowledged write is back");
    assert_eq!(common::agents(&after).len(), 6);
    assert_eq!(
        after["flags"]["at-limit"].as_array().map(Vec::len),
        Some(run_doc::rules::MAX_FLAG_VALUES - 1)
    );
    let (_, health) = c.get(&node.url("/actuator/health")).await;
    assert_eq!(health["components"]["eventLog"]["status"], "UP", "{health}");
}

/// A stored change that does not load (here: bytes cut short behind the node's back) is
/// reported loudly — health, metric, log — and nothing is removed from the log: the run is
/// served with what does load, and new writes append after the damaged rows.
async fn a_stored_change_that_does_not_load_is_reported_and_the_log_kept(backend: Backend) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let mut node = Node::spawn(&db, &[]);
    for i in 0..3 {
        flag(&c, &node, run, &format!("k{i}"), json!(i)).await;
    }
    node.kill();
    let cut = match backend {
        Backend::Postgres => "substring(crdt_changes from 1 for 20)",
        Backend::Sqlite => "substr(crdt_changes, 1, 20)",
    };
    let damaged = db::execute(
        &db,
        &format!(
            "UPDATE collaboration_events SET crdt_changes = {cut} WHERE run_id = {} AND run_seq = 2",
            db::run_literal(&db, run)
        ),
    )
    .await;
    assert_eq!(damaged, 1);

    let node = Node::spawn(&db, &[]);
    let s = state(&c, &node, run).await;
    assert_eq!(
        s["flags"]["k0"], 0,
        "what does not depend on the damage is served"
    );
    let (status, health) = c.get(&node.url("/actuator/health")).await;
    assert_eq!(status, 200, "the node keeps serving: {health}");
    let log = &health["components"]["eventLog"];
    assert_eq!(log["status"], "DEGRADED", "{health}");
    assert_eq!(log["runs"][0]["runId"], run.to_string(), "{health}");
    assert_eq!(
        log["runs"][0]["unloadableChanges"], 2,
        "the cut one and the one after it"
    );
    let metrics = c.text(&node.url("/actuator/prometheus")).await;
    assert_eq!(
        common::metric(&metrics, "crdt_stored_changes_unloadable"),
        Some(2.0)
    );
    assert!(node.log_text().contains("did not load"), "logged");
    flag(&c, &node, run, "k9", json!(9)).await;
    assert_eq!(
        db::event_rows(&db, run).await,
        4,
        "no row removed; the new one appended"
    );
}

#[test]
fn bad_configuration_stops_start_up_naming_the_key() {
    for (var, value, key) in [
        ("PORT", "eighty", "port"),
        ("REGION", "us east 1", "crdt.region"),
        ("CRDT_MESH_PEERS", "http://x/ws", "crdt.mesh.peers"),
        ("CRDT_SNAPSHOT_EVERY", "0", "crdt.snapshot.every-events"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_crdt-node"))
            .env(
                "CRDT_CONFIG",
                concat!(env!("CARGO_MANIFEST_DIR"), "/config/application.yml"),
            )
            .env(
                "DATABASE_URL",
                "sqlite:///nonexistent-dir-never-created/x.db",
            )
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{var}={value}: {err}");
    }
}

/// A PostgreSQL database that does not exist stops start-up with the way past it: create it,
/// or let the node (issue 20: a newcomer's first start against a fresh server).
#[test]
fn a_missing_database_says_how_to_create_it() {
    let url = format!(
        "{}/crdt_never_created_{}",
        common::pg_admin_url().trim_end_matches("/postgres"),
        Uuid::new_v4().simple()
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_crdt-node"))
        .env(
            "CRDT_CONFIG",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/application.yml"),
        )
        .env("DATABASE_URL", &url)
        .env("PORT", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");
    assert!(err.contains("DATABASE_CREATE_IF_MISSING=true"), "{err}");
}

/// With every commit slowed to half a second, the node holds many applied-but-uncommitted
/// writes at any moment; SIGKILL it then, and every write it acknowledged is still there.
/// (PostgreSQL only: the commit is slowed by a trigger.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_inside_slow_commits_loses_no_acknowledged_write() {
    let db = TestDb::new(Backend::Postgres).await;
    let run = Uuid::new_v4();
    let mut node = Node::spawn(&db, &[]);
    db::on_insert(&db, "slow", "PERFORM pg_sleep(0.5); RETURN NULL;").await;
    let mut tasks = Vec::new();
    for client in 0..16 {
        let url = run_url(&node, run, "/grafts");
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut acked = Vec::new();
            for i in 0.. {
                let agent = format!("c{client}-{i}");
                let body = json!({"agent": agent, "afterStep": "S", "user": "u"});
                match http.post(&url).json(&body).send().await {
                    Ok(r) if r.status().as_u16() == 201 => acked.push(agent),
                    _ => break,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(1800)).await;
    node.kill();
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert!(
        acked.len() >= 16,
        "only {} writes were acknowledged",
        acked.len()
    );
    db::drop_on_insert(&db, "slow").await;
    let node = Node::spawn(&db, &[]);
    let present: HashSet<String> = common::agents(&state(&Client::new(), &node, run).await)
        .into_iter()
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|a| !present.contains(*a)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged grafts lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
}

/// A node whose connections to PostgreSQL pass through a proxy the test can cut or black-hole.
async fn node_through_proxy(db: &TestDb, env: &[(&str, &str)]) -> (Node, common::proxy::Proxy) {
    let proxy = common::proxy::Proxy::start().await;
    let pg = url::Url::parse(&db.url).unwrap();
    proxy.target(&format!(
        "{}:{}",
        pg.host_str().unwrap(),
        pg.port().unwrap_or(5432)
    ));
    let mut through = pg.clone();
    through.set_host(Some("127.0.0.1")).unwrap();
    through.set_port(Some(proxy.addr.port())).unwrap();
    let mut all = vec![("DATABASE_URL", through.as_str())];
    all.extend_from_slice(env);
    (Node::spawn(db, &all), proxy)
}

/// PostgreSQL out of reach (the node's connections to it cut by a proxy): mutations get 503
/// with a reason and are never acknowledged; reads of a loaded run keep serving its durable
/// state; readiness says not ready; when the database returns, everything resumes by itself,
/// and only acknowledged mutations exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_refuses_writes_keeps_reads_and_recovers() {
    let db = TestDb::new(Backend::Postgres).await;
    let (node, proxy) = node_through_proxy(&db, &[]).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    flag(&c, &node, run, "before", json!(1)).await;
    let ready = node.url("/actuator/health/readiness");
    assert_eq!(c.get(&ready).await.0, 200);

    proxy.cut();
    let url = run_url(&node, run, "/flags/during");
    let (s, body) = c.put(&url, &json!({"value": 2, "user": "u"})).await;
    assert_eq!(s, 503, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("database"),
        "{body}"
    );
    // Refused at once now, without waiting on the database.
    let started = std::time::Instant::now();
    let (s, _) = c.put(&url, &json!({"value": 3, "user": "u"})).await;
    assert_eq!(s, 503);
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    // The loaded run still reads, showing only what is durable.
    let st = state(&c, &node, run).await;
    assert_eq!(st["flags"], json!({"before": 1}), "{st}");
    let (s, body) = c.get(&ready).await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["components"]["db"]["status"], "DOWN");

    proxy.heal();
    let back = common::eventually(30, || async {
        let (s, _) = c.put(&url, &json!({"value": 4, "user": "u"})).await;
        (s == 200).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "writes did not resume:\n{}",
        node.log_text()
    );
    assert_eq!(c.get(&ready).await.0, 200);
    let st = state(&c, &node, run).await;
    assert_eq!(st["flags"], json!({"before": 1, "during": 4}), "{st}");
    drop(node);
    // After a restart straight on the database, the same: refused writes never resurface.
    let node = Node::spawn(&db, &[]);
    let st = state(&c, &node, run).await;
    assert_eq!(st["flags"], json!({"before": 1, "during": 4}), "{st}");
}

/// A copy taken for a snapshot while writes were on their way holds those writes. When the
/// database drops out under them the run rolls back to what is stored, and later writes take
/// the same log positions again: the copy must never be saved, or the snapshot would hold
/// changes the log never got. Eight clients write without pause, a snapshot due every 2
/// events, while PostgreSQL is cut off six times for 150 ms; every stored snapshot must hold
/// exactly the log up to its count. (Here writes resume later than a copy is waited for, so
/// this guards the whole path under outages; the epoch's own case, a copy outliving a refusal
/// until the log passes its position again, is unit-tested in `run_actor/snapshot_copy.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_never_saves_a_copy_holding_refused_writes() {
    let db = TestDb::new(Backend::Postgres).await;
    let env = [
        ("CRDT_SNAPSHOT_EVERY", "2"),
        ("CRDT_SNAPSHOT_MIN_INTERVAL_MS", "0"),
        ("CRDT_SNAPSHOT_KEEP", "1000"),
    ];
    let (node, proxy) = node_through_proxy(&db, &env).await;
    let run = Uuid::new_v4();
    flag(&Client::new(), &node, run, "start", json!(0)).await;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let writers = futures_util::future::join_all((0..8).map(|w| {
        let (node, stop) = (&node, &stop);
        async move {
            let c = Client::new();
            let mut refused = 0;
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (s, body) = c
                    .put(
                        &run_url(node, run, &format!("/flags/w{w}-{i}")),
                        &json!({"value": i, "user": "u"}),
                    )
                    .await;
                assert!(s == 200 || s == 503, "{s} {body}");
                refused += usize::from(s == 503);
                i += 1;
            }
            refused
        }
    }));
    let outages = async {
        for _ in 0..6 {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            proxy.cut();
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            proxy.heal();
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    let (refused, ()) = futures_util::join!(writers, outages);
    assert!(refused.iter().sum::<usize>() > 0, "no write was refused");
    let c = Client::new();
    common::eventually(30, || async {
        let (s, _) = c
            .put(
                &run_url(&node, run, "/flags/end"),
                &json!({"value": 1, "user": "u"}),
            )
            .await;
        (s == 200).then_some(())
    })
    .await
    .expect("writes resume");
    let st = state(&c, &node, run).await;
    let total = st["flags"].as_object().expect("flags").len() as i32;
    a_snapshot_near_the_end(&db, run, total).await;
    let (logged, checked) = snapshots_match_the_log(&db, run).await;
    assert_eq!(logged as i32, total, "one event per flag acknowledged");
    assert!(checked >= 3, "only {checked} snapshots");
}

/// SIGTERM: the node finishes, snapshots every run with events no snapshot covers, and exits
/// 0 well within its grace; the next start loads from those snapshots.
async fn sigterm_snapshots_dirty_runs_and_exits_cleanly(backend: Backend) {
    let db = TestDb::new(backend).await;
    // Snapshots by count would never come: only the final one can cover these events.
    let env = [
        ("CRDT_SNAPSHOT_EVERY", "100000"),
        ("CRDT_SHUTDOWN_GRACE_SECS", "10"),
    ];
    let mut node = Node::spawn(&db, &env);
    let c = Client::new();
    let runs: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for (i, run) in runs.iter().enumerate() {
        for k in 0..=i {
            flag(&c, &node, *run, &format!("k{k}"), json!(k)).await;
        }
    }
    let started = std::time::Instant::now();
    let status = node.terminate(20).expect("the node did not exit");
    assert!(status.success(), "{status:?}\n{}", node.log_text());
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert!(
        node.log_text().contains("3 run(s) snapshotted"),
        "{}",
        node.log_text()
    );
    for (i, run) in runs.iter().enumerate() {
        let positions = db::snapshot_positions(&db, *run).await;
        assert_eq!(
            positions.first().copied(),
            Some(i as i32 + 1),
            "run {i}: {positions:?}"
        );
    }
    let node = Node::spawn(&db, &[]);
    let st = state(&c, &node, runs[2]).await;
    assert_eq!(st["flags"], json!({"k0": 0, "k1": 1, "k2": 2}));
}

/// A database that stops answering without closing anything (a black-holed network): writes
/// are refused with 503 after the write timeout instead of hanging, reads of the loaded run go
/// on, and everything resumes once the network heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_database_times_out_writes_instead_of_hanging() {
    let db = TestDb::new(Backend::Postgres).await;
    let (node, proxy) = node_through_proxy(&db, &[("DATABASE_WRITE_TIMEOUT_MS", "1000")]).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    flag(&c, &node, run, "before", json!(1)).await;

    proxy.blackhole();
    let url = run_url(&node, run, "/flags/during");
    let started = std::time::Instant::now();
    let (s, body) = c.put(&url, &json!({"value": 2, "user": "u"})).await;
    assert_eq!(s, 503, "{body}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "the write hung for {:?}",
        started.elapsed()
    );
    let st = state(&c, &node, run).await;
    assert_eq!(st["flags"], json!({"before": 1}), "{st}");

    proxy.heal();
    let back = common::eventually(30, || async {
        let (s, _) = c.put(&url, &json!({"value": 3, "user": "u"})).await;
        (s == 200).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "writes did not resume:\n{}",
        node.log_text()
    );
    let st = state(&c, &node, run).await;
    assert_eq!(st["flags"], json!({"before": 1, "during": 3}), "{st}");
}

/// A run whose snapshot holds everything stored answers its first read and a retried graft
/// from the projection kept with the snapshot, while the document loads; other requests wait
/// for the document, and from then on the document answers. (The stored projection is marked
/// with a flag the run does not hold, to tell which one answered.)
async fn a_cold_run_answers_from_its_projection_while_it_loads(backend: Backend) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let mut node = Node::spawn(&db, &[]);
    let first = Uuid::new_v4();
    for i in 0..40 {
        let id = if i == 0 { first } else { Uuid::new_v4() };
        let (s, body) = c
            .post(
                &run_url(&node, run, "/grafts"),
                &json!({"agent": format!("A{i}"), "afterStep": "S1", "user": "u", "id": id}),
            )
            .await;
        assert_eq!(s, 201, "{body}");
    }
    c.post(
        &run_url(&node, run, "/pruned-steps"),
        &json!({"stepId": "S2", "user": "u"}),
    )
    .await;
    flag(&c, &node, run, "k", json!({"x": [1, 2]})).await;
    let before = state(&c, &node, run).await;
    // SIGTERM writes the final snapshot, with its projection.
    assert!(node.terminate(20).is_some_and(|s| s.success()));
    let stored = db::snapshot_projection(&db, run)
        .await
        .expect("the final snapshot carries a projection");
    let mut projection = run_doc::Projection::decode(&stored).expect("it decodes");
    let shown: Value = serde_json::from_str(projection.state.json()).unwrap();
    for (key, value) in shown.as_object().unwrap() {
        assert!(
            before[key] == *value,
            "the projection's {key} is what the node showed"
        );
    }
    let mut marked = (**projection.state).clone();
    marked
        .flags
        .insert("marker".into(), json!("from the projection"));
    projection = projection.with_state(marked);
    db::set_snapshot_projection(&db, run, &projection.encode()).await;

    let node = Node::spawn(&db, &[]);
    let cold = state(&c, &node, run).await;
    assert_eq!(cold["flags"]["marker"], "from the projection");
    assert_eq!(cold["grafts"], before["grafts"]);
    assert_eq!(cold["heads"], before["heads"]);
    let (s, retried) = c
        .post(
            &run_url(&node, run, "/grafts"),
            &json!({"agent": "A0", "afterStep": "S1", "user": "u", "id": first}),
        )
        .await;
    assert_eq!(s, 201, "{retried}");
    assert_eq!(retried["changed"], false);
    assert_eq!(retried["graft"], before["grafts"][0]);
    // A write waits for the document; then the document answers, its graft index built from
    // the projection.
    let (s, body) = c
        .post(
            &run_url(&node, run, "/grafts"),
            &json!({"agent": "New", "afterStep": "S1", "user": "u"}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let after = state(&c, &node, run).await;
    assert!(after["flags"].get("marker").is_none(), "{after}");
    let grafts = after["grafts"].as_array().unwrap();
    assert_eq!(grafts.len(), 41);
    assert_eq!(grafts[..40], before["grafts"].as_array().unwrap()[..]);
    assert_eq!(after["prunedSteps"], before["prunedSteps"]);
    assert_eq!(after["lamport"], before["lamport"].as_u64().unwrap() + 1);
}
