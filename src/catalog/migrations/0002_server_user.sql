-- cairn catalog schema v2: servers remember who created them (Compute's server view shows
-- `user_id`).
ALTER TABLE servers ADD COLUMN user_id TEXT REFERENCES users(id) ON DELETE SET NULL;
