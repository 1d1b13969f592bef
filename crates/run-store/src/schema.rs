//! diesel table definitions, one module per backend: PostgreSQL has UUID columns, the SQLite
//! mirror stores them as 16-byte BLOBs. Keep both in step with `migrations/`.

pub mod pg {
    diesel::table! {
        collaboration_events (id) {
            id -> BigInt,
            run_id -> Uuid,
            event_type -> Varchar,
            payload -> Nullable<Text>,
            user_id -> Nullable<Varchar>,
            created_at -> Timestamp,
            crdt_changes -> Nullable<Bytea>,
            source_region -> Nullable<Varchar>,
            lamport_timestamp -> Nullable<BigInt>,
            run_seq -> Nullable<BigInt>,
            change_hash -> Nullable<Bytea>,
            event_kind -> Nullable<Varchar>,
            event_content -> Nullable<Text>,
            owner_epoch -> Nullable<BigInt>,
        }
    }

    diesel::table! {
        crdt_snapshots (id) {
            id -> Uuid,
            run_id -> Uuid,
            snapshot_data -> Bytea,
            lamport_timestamp -> BigInt,
            region -> Varchar,
            created_at -> Timestamp,
            event_count -> Nullable<Integer>,
            projection -> Nullable<Bytea>,
        }
    }

    diesel::table! {
        crdt_runs (run_id) {
            run_id -> Uuid,
            last_activity -> Timestamp,
        }
    }

    diesel::table! {
        crdt_webhooks (id) {
            id -> Varchar,
            url -> Text,
            secret -> Text,
            runs -> Nullable<Text>,
            kinds -> Nullable<Text>,
            origin -> Varchar,
            created_at -> Timestamp,
        }
    }

    diesel::table! {
        crdt_webhook_outbox (id) {
            id -> BigInt,
            subscription_id -> Varchar,
            event_id -> BigInt,
            run_id -> Uuid,
            attempts -> Integer,
            next_attempt_at -> Timestamp,
            state -> Varchar,
            last_error -> Nullable<Text>,
            created_at -> Timestamp,
        }
    }

    diesel::allow_tables_to_appear_in_same_query!(collaboration_events, crdt_webhook_outbox);
}

pub mod sqlite {
    diesel::table! {
        collaboration_events (id) {
            id -> BigInt,
            run_id -> Binary,
            event_type -> Text,
            payload -> Nullable<Text>,
            user_id -> Nullable<Text>,
            created_at -> Timestamp,
            crdt_changes -> Nullable<Binary>,
            source_region -> Nullable<Text>,
            lamport_timestamp -> Nullable<BigInt>,
            run_seq -> Nullable<BigInt>,
            change_hash -> Nullable<Binary>,
            event_kind -> Nullable<Text>,
            event_content -> Nullable<Text>,
        }
    }

    diesel::table! {
        crdt_snapshots (id) {
            id -> Binary,
            run_id -> Binary,
            snapshot_data -> Binary,
            lamport_timestamp -> BigInt,
            region -> Text,
            created_at -> Timestamp,
            event_count -> Nullable<Integer>,
            projection -> Nullable<Binary>,
        }
    }

    diesel::table! {
        crdt_runs (run_id) {
            run_id -> Binary,
            last_activity -> Timestamp,
        }
    }

    diesel::table! {
        crdt_webhooks (id) {
            id -> Text,
            url -> Text,
            secret -> Text,
            runs -> Nullable<Text>,
            kinds -> Nullable<Text>,
            origin -> Text,
            created_at -> Timestamp,
        }
    }

    diesel::table! {
        crdt_webhook_outbox (id) {
            id -> BigInt,
            subscription_id -> Text,
            event_id -> BigInt,
            run_id -> Binary,
            attempts -> Integer,
            next_attempt_at -> Timestamp,
            state -> Text,
            last_error -> Nullable<Text>,
            created_at -> Timestamp,
        }
    }

    diesel::allow_tables_to_appear_in_same_query!(collaboration_events, crdt_webhook_outbox);
}
