//! The append's fixed statements as query fragments that diesel keeps prepared.
//!
//! diesel prepares a `sql_query` and an upsert anew on every execution, since it cannot know
//! their text is fixed. The append runs one of each per run per commit on the writer
//! connection, the one thread every commit queues behind: parsing them was 12% of that
//! thread's time under wrk. These carry a type of their own, which diesel caches them by.

use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Binary, Timestamp, Untyped};
use diesel::sqlite::Sqlite;
use diesel::{QueryResult, RunQueryDsl, SqliteConnection};

/// Where the log ends (the rows after it are this transaction's) and whether any subscription
/// may want an outbox row. Read as [`super::AppendStart`].
pub(super) struct BeginAppend;

/// Records a run's latest activity, never moving it back.
pub(super) struct TouchRun<'a> {
    pub run_id: &'a [u8],
    pub last_activity: chrono::NaiveDateTime,
}

const BEGIN_APPEND: &str =
    "SELECT COALESCE((SELECT MAX(id) FROM collaboration_events), 0) AS before, \
    EXISTS (SELECT 1 FROM crdt_webhooks) AS hooks";

impl QueryId for BeginAppend {
    type QueryId = BeginAppend;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl QueryFragment<Sqlite> for BeginAppend {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        out.push_sql(BEGIN_APPEND);
        Ok(())
    }
}

impl Query for BeginAppend {
    type SqlType = Untyped;
}

impl RunQueryDsl<SqliteConnection> for BeginAppend {}

impl QueryId for TouchRun<'_> {
    type QueryId = TouchRun<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl QueryFragment<Sqlite> for TouchRun<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        out.push_sql("INSERT INTO crdt_runs (run_id, last_activity) VALUES (");
        out.push_bind_param::<Binary, _>(&self.run_id)?;
        out.push_sql(", ");
        out.push_bind_param::<Timestamp, _>(&self.last_activity)?;
        out.push_sql(
            ") ON CONFLICT (run_id) DO UPDATE \
            SET last_activity = MAX(crdt_runs.last_activity, excluded.last_activity)",
        );
        Ok(())
    }
}

impl RunQueryDsl<SqliteConnection> for TouchRun<'_> {}
