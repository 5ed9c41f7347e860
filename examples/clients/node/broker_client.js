// A box-token-broker client in Node (@grpc/grpc-js, protos loaded at run
// time with @grpc/proto-loader): the Service Account's token, then a token
// downscoped to one file, printed as one JSON object (never the tokens:
// they are bearer credentials).
//
//   node broker_client.js ADDRESS [--ca-file FILE] [--api-key-file FILE] [--file-id ID] [--proto-dir DIR]
//
// ADDRESS is host:port (plaintext, or TLS with --ca-file) or a Unix socket,
// unix:/run/box-broker/broker.sock. Against `box-broker dev`:
//
//   npm ci && node broker_client.js 127.0.0.1:50051
//
// A failed call prints the gRPC status, what to fix, and the broker's
// machine-readable reason (google.rpc.ErrorInfo in grpc-status-details-bin),
// and exits 1.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

function parseArgs(argv) {
  const args = { fileId: "7600001", protoDir: path.join(__dirname, "..", "..", "..", "proto") };
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${flag} needs a value`);
      return argv[++i];
    };
    if (flag === "--ca-file") args.caFile = value();
    else if (flag === "--api-key-file") args.apiKeyFile = value();
    else if (flag === "--file-id") args.fileId = value();
    else if (flag === "--proto-dir") args.protoDir = value();
    else rest.push(flag);
  }
  if (rest.length !== 1) throw new Error("usage: node broker_client.js ADDRESS [--ca-file F] [--api-key-file F] [--file-id ID]");
  args.address = rest[0];
  return args;
}

// google.rpc.Status and ErrorInfo, enough to read the broker's details.
const rpcTypes = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: { nested: { Any: { fields: { type_url: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } } } } },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: "int32", id: 1 },
                message: { type: "string", id: 2 },
                details: { rule: "repeated", type: "google.protobuf.Any", id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: "string", id: 1 },
                domain: { type: "string", id: 2 },
                metadata: { keyType: "string", type: "string", id: 3 },
              },
            },
          },
        },
      },
    },
  },
});

// The ErrorInfo reason of a failed call, as " (reason X, k=v)", or "".
function reason(error) {
  const raw = error.metadata && error.metadata.get("grpc-status-details-bin")[0];
  if (!raw) return "";
  const status = rpcTypes.lookupType("google.rpc.Status").decode(raw);
  for (const detail of status.details) {
    if (detail.type_url === "type.googleapis.com/google.rpc.ErrorInfo") {
      const info = rpcTypes.lookupType("google.rpc.ErrorInfo").decode(detail.value);
      const extra = Object.keys(info.metadata || {})
        .sort()
        .map((k) => `, ${k}=${info.metadata[k]}`)
        .join("");
      return ` (reason ${info.reason}${extra})`;
    }
  }
  return "";
}

function call(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + 10000 }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const definition = protoLoader.loadSync("boxbroker/v1/broker.proto", {
    includeDirs: [args.protoDir],
    keepCase: true,
    longs: String,
    defaults: true,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(definition).boxbroker.v1;
  const credentials = args.caFile
    ? grpc.credentials.createSsl(fs.readFileSync(args.caFile))
    : grpc.credentials.createInsecure();
  const client = new pkg.TokenBrokerService(args.address, credentials);
  const metadata = new grpc.Metadata();
  if (args.apiKeyFile) metadata.set("x-api-key", fs.readFileSync(args.apiKeyFile, "utf8").trim());

  const enterprise = { enterprise: {} };
  try {
    const full = await call(client, "GetToken", { subject: enterprise }, metadata);
    const down = await call(
      client,
      "GetDownscopedToken",
      { subject: enterprise, scopes: ["item_preview"], file_id: args.fileId },
      metadata,
    );
    const seconds = Number(full.token.expires_at.seconds);
    console.log(
      JSON.stringify({
        enterprise: {
          token_length: full.token.access_token.length,
          expires_at: new Date(seconds * 1000).toISOString(),
          cache_hit: full.cache_hit,
        },
        downscoped: {
          token_length: down.token.access_token.length,
          scopes: down.token.scopes,
          restricted_to: down.token.restricted_to.map((r) => ({
            scope: r.scope,
            object_type: r.object_type,
            object_id: r.object_id,
          })),
        },
      }),
    );
    return 0;
  } catch (error) {
    const code = Object.keys(grpc.status).find((name) => grpc.status[name] === error.code) || error.code;
    console.error(`${code}: ${error.details}${reason(error)}`);
    return 1;
  } finally {
    client.close();
  }
}

main().then(
  (code) => process.exit(code),
  (error) => {
    console.error(`error: ${error.message}`);
    process.exit(64);
  },
);
