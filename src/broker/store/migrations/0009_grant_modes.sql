-- Grants gain a mode: 'resolve' (the secret is released to the executor, as before) or
-- 'proxy' (the broker makes calls with it; Resolve is refused); and, for proxy grants, a
-- scope: a JSON object of methods, path_prefixes and tools (empty lists allow any).
ALTER TABLE grants ADD COLUMN mode TEXT NOT NULL DEFAULT 'resolve' CHECK (mode IN ('resolve', 'proxy'));
ALTER TABLE grants ADD COLUMN scope TEXT NOT NULL DEFAULT '{}';
