use std::path::Path;

use rusqlite::Connection;

use super::{
    Catalog, CatalogError, SCHEMA_VERSION, open_connection,
    schema::{self, MIGRATIONS, Migration},
};

fn tables(conn: &Connection) -> Vec<String> {
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        .expect("prepare");
    stmt.query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

fn pragma(conn: &Connection, name: &str) -> String {
    conn.query_row(&format!("PRAGMA {name}"), [], |r| {
        r.get::<_, rusqlite::types::Value>(0)
    })
    .map(|v| match v {
        rusqlite::types::Value::Integer(i) => i.to_string(),
        rusqlite::types::Value::Text(s) => s,
        other => format!("{other:?}"),
    })
    .expect("pragma")
}

#[test]
fn migrations_are_numbered_one_by_one() {
    for (i, m) in MIGRATIONS.iter().enumerate() {
        assert_eq!(
            m.version as usize,
            i + 1,
            "migration {} out of order",
            m.name
        );
    }
    assert_eq!(SCHEMA_VERSION as usize, MIGRATIONS.len());
}

#[test]
fn fresh_create_applies_every_migration_and_sets_pragmas() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("catalog.sqlite");
    let conn = open_connection(&path).expect("open");
    assert_eq!(
        schema::user_version(&conn).expect("version"),
        SCHEMA_VERSION
    );
    let t = tables(&conn);
    for want in [
        "attachments",
        "filesystem_instances",
        "filesystems",
        "images",
        "projects",
        "role_assignments",
        "roles",
        "servers",
        "tokens",
        "users",
        "volumes",
    ] {
        assert!(t.iter().any(|n| n == want), "table {want} missing: {t:?}");
    }
    assert_eq!(pragma(&conn, "journal_mode"), "wal");
    assert_eq!(
        pragma(&conn, "synchronous"),
        "2",
        "synchronous must be FULL"
    );
    assert_eq!(pragma(&conn, "foreign_keys"), "1");
    // Foreign keys are enforced, not just declared.
    let err = conn
        .execute(
            "INSERT INTO volumes (id, project_id, size_bytes, status, created_at, updated_at)
             VALUES ('v1', 'no-such-project', 1, 'available', 'now', 'now')",
            [],
        )
        .expect_err("dangling project_id must be refused");
    assert!(err.to_string().contains("FOREIGN KEY"), "{err}");
}

#[test]
fn reopen_keeps_data_and_does_not_reapply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("catalog.sqlite");
    {
        let conn = open_connection(&path).expect("open");
        conn.execute(
            "INSERT INTO projects (id, name, created_at) VALUES ('p1', 'admin', 'now')",
            [],
        )
        .expect("insert");
    }
    // Reapplying migration 1 would fail on CREATE TABLE, so success proves it was skipped.
    let conn = open_connection(&path).expect("reopen");
    assert_eq!(
        schema::user_version(&conn).expect("version"),
        SCHEMA_VERSION
    );
    let name: String = conn
        .query_row("SELECT name FROM projects WHERE id = 'p1'", [], |r| {
            r.get(0)
        })
        .expect("row survives");
    assert_eq!(name, "admin");
}

fn make_newer(path: &Path) {
    let conn = Connection::open(path).expect("open raw");
    conn.execute_batch(&format!(
        "CREATE TABLE from_the_future (x); PRAGMA user_version = {};",
        SCHEMA_VERSION + 1
    ))
    .expect("setup");
}

#[test]
fn newer_version_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("catalog.sqlite");
    make_newer(&path);
    let before = std::fs::read(&path).expect("read");

    let err = open_connection(&path).expect_err("newer schema must be refused");
    match &err {
        CatalogError::NewerSchema { found, supported } => {
            assert_eq!(*found, i64::from(SCHEMA_VERSION + 1));
            assert_eq!(*supported, SCHEMA_VERSION);
        }
        other => panic!("wrong error: {other}"),
    }
    assert!(err.to_string().contains("newer"), "{err}");
    assert_eq!(
        std::fs::read(&path).expect("read"),
        before,
        "file was modified"
    );
    let conn = Connection::open(&path).expect("open raw");
    assert_eq!(
        pragma(&conn, "journal_mode"),
        "delete",
        "journal mode was changed"
    );
    assert!(!tables(&conn).iter().any(|t| t == "volumes"));
}

#[test]
fn failed_migration_rolls_back_entirely() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut conn = Connection::open(dir.path().join("c.sqlite")).expect("open");
    let migrations = [
        Migration {
            version: 1,
            name: "good",
            sql: "CREATE TABLE a (x);",
        },
        Migration {
            version: 2,
            name: "bad",
            sql: "CREATE TABLE b (x); INSERT INTO nope VALUES (1);",
        },
    ];
    let err = schema::migrate(&mut conn, &migrations).expect_err("must fail");
    assert!(
        matches!(err, CatalogError::Migration { version: 2, .. }),
        "{err}"
    );
    assert_eq!(schema::user_version(&conn).expect("version"), 1);
    let t = tables(&conn);
    assert!(t.contains(&"a".to_owned()), "{t:?}");
    assert!(
        !t.contains(&"b".to_owned()),
        "half-applied migration left {t:?}"
    );

    // A newer-than-known database is refused by migrate itself too.
    conn.pragma_update(None, "user_version", 5).expect("bump");
    let err = schema::migrate(&mut conn, &migrations[..1]).expect_err("must refuse");
    assert!(
        matches!(err, CatalogError::NewerSchema { found: 5, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn catalog_thread_runs_calls_and_closes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("catalog.sqlite");
    let catalog = Catalog::open(&path).await.expect("open");
    catalog.ping().await.expect("ping");
    assert_eq!(
        catalog.schema_version().await.expect("version"),
        SCHEMA_VERSION
    );

    catalog
        .call(|conn| {
            conn.execute(
                "INSERT INTO projects (id, name, created_at) VALUES ('p1', 'demo', 'now')",
                [],
            )?;
            Ok(())
        })
        .await
        .expect("insert");
    // Errors and panics come back as errors and leave the thread serving.
    let dup = catalog
        .call(|conn| {
            conn.execute(
                "INSERT INTO projects (id, name, created_at) VALUES ('p1', 'demo', 'now')",
                [],
            )?;
            Ok(())
        })
        .await;
    assert!(matches!(dup, Err(CatalogError::Sqlite(_))), "{dup:?}");
    let panicked = catalog
        .call(|_| -> super::Result<()> { panic!("boom") })
        .await;
    assert!(
        matches!(&panicked, Err(CatalogError::Panicked(m)) if m == "boom"),
        "{panicked:?}"
    );
    catalog.ping().await.expect("still serving after a panic");

    let clone = catalog.clone();
    catalog.close().await.expect("close");
    assert!(matches!(clone.ping().await, Err(CatalogError::Closed)));

    // Closed means checkpointed: the WAL is empty and the data is in the main file.
    let wal = dir.path().join("catalog.sqlite-wal");
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(wal_len, 0, "WAL not checkpointed");
    let conn = Connection::open(&path).expect("reopen raw");
    let n: i64 = conn
        .query_row("SELECT count(*) FROM projects", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 1);
}

#[tokio::test]
async fn catalog_open_reports_newer_schema() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("catalog.sqlite");
    make_newer(&path);
    let err = Catalog::open(&path).await.expect_err("must refuse");
    assert!(matches!(err, CatalogError::NewerSchema { .. }), "{err}");
}
