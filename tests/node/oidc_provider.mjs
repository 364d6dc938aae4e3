// panva's oidc-provider (a certified OpenID Provider) as the reference authorization server of
// tests/integration/test_oauth_reference_server.py. Copied next to its installed package and run
// by tests/nodeservers.py; configured by environment variables so no value is written here.
import Provider, { errors } from "oidc-provider";

const env = process.env;
const issuer = `http://127.0.0.1:${env.PORT}`;
const provider = new Provider(issuer, {
  clients: [
    {
      // A person signs in for it: authorization code with PKCE, refresh tokens.
      client_id: "broker-web",
      client_secret: env.WEB_SECRET,
      application_type: "native", // a redirect to http://127.0.0.1 is a native app's
      grant_types: ["authorization_code", "refresh_token"],
      response_types: ["code"],
      redirect_uris: [env.REDIRECT_URI],
    },
    {
      client_id: "broker-machine",
      client_secret: env.MACHINE_SECRET,
      grant_types: ["client_credentials"],
      response_types: [],
      redirect_uris: [],
    },
    // What the test uses to ask whether a token is still active (RFC 7662).
    { client_id: "inspector", client_secret: env.MACHINE_SECRET, grant_types: [], response_types: [], redirect_uris: [] },
  ],
  scopes: ["openid", "offline_access", "api:read"],
  features: {
    devInteractions: { enabled: true },
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
    introspection: { enabled: true },
    // RFC 7591, for tests/integration/test_mcp_oauth_discovery.py: open registration when asked.
    registration: { enabled: env.REGISTRATION === "1" },
    resourceIndicators: {
      enabled: true,
      // A token request without `resource` gets no API audience: the client must ask every time.
      useGrantedResource: () => false,
      getResourceServerInfo: (ctx, resource) => {
        if (resource !== env.API) throw new errors.InvalidTarget();
        return { scope: "api:read", audience: env.API, accessTokenTTL: Number(env.TOKEN_TTL), accessTokenFormat: "opaque" };
      },
    },
  },
  issueRefreshToken: async (ctx, client, code) =>
    client.grantTypeAllowed("refresh_token") && code.scopes.has("offline_access"),
});
provider.listen(Number(env.PORT), "127.0.0.1");
