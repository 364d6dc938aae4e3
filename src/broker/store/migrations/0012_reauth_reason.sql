-- Why an oauth2 connection needs re-authorization, next to when (reauth_required_at): a JSON
-- object of the broker's reason token, the provider's error code and its scrubbed description.
-- NULL while it needs none, and on rows expired before this column existed.
ALTER TABLE connections ADD COLUMN reauth_reason TEXT;
