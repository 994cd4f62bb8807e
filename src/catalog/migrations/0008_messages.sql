-- cairn catalog schema v8: Block Storage user messages (cinder's `messages`, microversion 3.3):
-- what went wrong in an asynchronous action after its request was answered, e.g. an upload to
-- an image that failed. Timestamps are fixed-width (`...:SS.ffffffZ`) so that expired ones can
-- be found by comparing text. A message outlives its resource (no foreign key on
-- resource_uuid) but not its project.
CREATE TABLE messages (
    id            TEXT PRIMARY KEY,
    project_id    TEXT NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    request_id    TEXT NOT NULL,
    resource_type TEXT,
    resource_uuid TEXT,
    event_id      TEXT NOT NULL,
    action_id     TEXT,
    detail_id     TEXT,
    message_level TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    expires_at    TEXT NOT NULL
);
CREATE INDEX messages_project ON messages(project_id);
CREATE INDEX messages_expires ON messages(expires_at);
-- The request that started an upload in progress, for the message if it fails (also after a
-- restart resumed it).
ALTER TABLE volumes ADD COLUMN upload_request_id TEXT;
