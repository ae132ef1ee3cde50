// A Node.js client of normserve built from the .proto alone, the way another team would write one
// (@grpc/grpc-js, whose protobuf.js keeps only the last occurrence of a field). The cross-language
// test, tests/test_node_client.py, runs it against the real server and compares with the Python client.
//
//   node client.js TARGET PROTO < {"layer": ..., "x": {"shape": [...], "values": [...]}, "dy": {...}}
//
// prints the answers as JSON: each tensor as {dtype, shape, values}, and the NOT_FOUND status of an
// Infer of a layer that does not exist.
"use strict";

const fs = require("node:fs");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [target, protoPath] = process.argv.slice(2);
const definition = protoLoader.loadSync(protoPath, {
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true, // an unset dtype reads as DTYPE_UNSPECIFIED and an unset shape as [], as a user sees them
  oneofs: true,
});
const { Normalization } = grpc.loadPackageDefinition(definition).normserve.v1;
const client = new Normalization(target, grpc.credentials.createInsecure());

// A Tensor: dtype, shape (outermost first), and the elements in C order as little-endian bytes.
function float32Tensor({ shape, values }) {
  const data = Buffer.alloc(values.length * 4);
  values.forEach((value, i) => data.writeFloatLE(value, i * 4));
  return { dtype: "FLOAT32", shape, data };
}

function readTensor(tensor) {
  if (tensor.dtype !== "FLOAT32") {
    throw new Error(`expected a FLOAT32 tensor, got dtype ${tensor.dtype} shape [${tensor.shape}]`);
  }
  const count = tensor.shape.reduce((product, dim) => product * dim, 1);
  if (tensor.data.length !== count * 4) {
    throw new Error(`shape [${tensor.shape}] needs ${count * 4} bytes, the tensor has ${tensor.data.length}`);
  }
  const values = [];
  for (let offset = 0; offset < tensor.data.length; offset += 4) values.push(tensor.data.readFloatLE(offset));
  return { dtype: tensor.dtype, shape: tensor.shape, values };
}

function call(method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 30000 }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

async function main() {
  const { layer, x, dy } = JSON.parse(fs.readFileSync(0, "utf8"));
  const created = await call("CreateLayer", {
    name: layer,
    config: { kind: "BATCH_NORM", num_features: x.shape[1] },
  });
  const train = await call("Train", { layer, x: float32Tensor(x) });
  const infer = await call("Infer", { layer, x: float32Tensor(x) });
  const gradient = await call("Gradient", { layer, x: float32Tensor(x), dy: float32Tensor(dy) });
  let notFound = null;
  try {
    await call("Infer", { layer: `${layer}-missing`, x: float32Tensor(x) });
  } catch (error) {
    notFound = { code: grpc.status[error.code], details: error.details };
  }
  const answers = {
    created: { name: created.name, version: created.version, param_shape: created.param_shape },
    train: { y: readTensor(train.y), version: train.version, num_batches_tracked: train.num_batches_tracked },
    infer: { y: readTensor(infer.y), version: infer.version },
    gradient: {
      dx: readTensor(gradient.dx),
      dweight: readTensor(gradient.dweight),
      dbias: readTensor(gradient.dbias),
    },
    not_found: notFound,
  };
  process.stdout.write(JSON.stringify(answers));
}

main()
  .catch((error) => {
    process.stderr.write(`${error.stack}\n`);
    process.exitCode = 1;
  })
  .finally(() => client.close());
