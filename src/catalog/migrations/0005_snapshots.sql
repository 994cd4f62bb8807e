-- cairn catalog schema v5: Block Storage snapshots. A snapshot is a copy-on-write clone of its
-- volume's store object (object_id), taken when it was created; a volume keeps the snapshot
-- it was made from. A volume with snapshots cannot be deleted (RESTRICT, and the API says so
-- first).
CREATE TABLE snapshots (
    id          TEXT PRIMARY KEY,
    project_id  TEXT NOT NULL REFERENCES projects(id) ON DELETE RESTRICT,
    user_id     TEXT REFERENCES users(id) ON DELETE SET NULL,
    volume_id   TEXT NOT NULL REFERENCES volumes(id) ON DELETE RESTRICT,
    name        TEXT,
    description TEXT,
    size_bytes  INTEGER NOT NULL CHECK (size_bytes >= 0),
    status      TEXT NOT NULL,
    object_id   TEXT UNIQUE,
    metadata    TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX snapshots_volume ON snapshots(volume_id);
CREATE INDEX snapshots_project ON snapshots(project_id);
ALTER TABLE volumes ADD COLUMN snapshot_id TEXT REFERENCES snapshots(id) ON DELETE SET NULL;
