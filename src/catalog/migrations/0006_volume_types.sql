-- cairn catalog schema v6: Block Storage volume types. `__DEFAULT__` (cinder's default type)
-- always exists and cannot be deleted; volumes name their type (volumes.volume_type).
CREATE TABLE volume_types (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    description TEXT,
    is_public   INTEGER NOT NULL DEFAULT 1 CHECK (is_public IN (0, 1)),
    extra_specs TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(extra_specs)),
    created_at  TEXT NOT NULL
);
INSERT INTO volume_types (id, name, description, created_at)
VALUES ('c0ffee00-0000-4000-8000-000000000001', '__DEFAULT__', 'Default Volume Type',
        '2026-12-07T00:00:00Z');
