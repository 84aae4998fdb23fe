#!/usr/bin/env node
// Command-line client of appliance.v1.ApplianceService, built from
// proto/appliance/v1/appliance.proto alone with @grpc/proto-loader and @grpc/grpc-js.
//
// It calls GetModelInfo, streams Generate, decodes each chunk's packed little-endian float32
// samples with their explicit shape, sends the beats and their classes back to Validate, and
// prints one JSON object to stdout. With --bad-count it sends Generate with count 0 instead and
// prints the gRPC status code and details, with exit code 0 only when that status is
// INVALID_ARGUMENT. Errors go to stderr with exit code 1, and invalid options exit with code 2.
//
// Usage (install the packages first with `make node-client`):
//   node clients/node/generate_validate.js --address 127.0.0.1:50051 --count 20 --seed 7
//   node clients/node/generate_validate.js --address 127.0.0.1:50051 --bad-count
//
// The channel has no TLS, so point it only at a server that listens on loopback.
"use strict";

const path = require("node:path");
const { parseArgs } = require("node:util");

const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");
const PROTO_FILE = "appliance/v1/appliance.proto";
const FLOAT32_BYTES = 4;
const MAX_UINT32 = 2 ** 32 - 1;
const MAX_UINT64 = 2n ** 64n - 1n;
// All beats go to Validate in one message, so the client limits --count to what one call may
// carry: GetModelInfo's max_beats_per_request, the request that fits max_message_bytes, and the
// reply that fits it. The sizes below are those that the appliance's server checks against:
// per beat, 2 bytes of class besides the samples in the request and 6 bytes in the reply.
const DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024;
const REQUEST_FIXED_BYTES = 1024;
const REQUEST_BYTES_PER_BEAT = 2;
const REPLY_FIXED_BYTES = 4096;
const REPLY_BYTES_PER_BEAT = 6;
const UNITS = {
  millivolt: "SAMPLE_UNIT_MILLIVOLT",
  normalised: "SAMPLE_UNIT_NORMALISED",
};

const USAGE = `Usage: node generate_validate.js [options]

Options:
  --address HOST:PORT    server address, no TLS (default: 127.0.0.1:50051)
  --count N              beats to generate, spread over the model's classes (default: 20)
  --seed S               seed of the latent draws, 0 to 2^64-1 (default: a random seed)
  --temperature T        latent temperature, above 0 and at most 5 (default: the server's, 1.0)
  --margin M             lowest accepted pertinence score, used by Generate and Validate
                         (default: the model's default_margin)
  --unit UNIT            unit of the beats: millivolt or normalised (default: millivolt)
  --chunk-beats N        beats per streamed response, 1 to 4096 (default: the server's, 256)
  --timeout-s SECONDS    deadline of each call in seconds (default: 300)
  --bad-count            send Generate with count 0 and print the status it fails with;
                         exit code 0 only for INVALID_ARGUMENT
  --help                 print this help`;

/** Error in the command-line options; the process exits with code 2. */
class UsageError extends Error {}

/**
 * Parses a whole number option and checks its range.
 * @param {string} name option name, for messages
 * @param {string} text option value
 * @param {number} min lowest valid value
 * @param {number} max highest valid value
 * @returns {number} the value
 */
function parseWholeNumber(name, text, min, max) {
  if (!/^\d+$/.test(text) || Number(text) < min || Number(text) > max) {
    throw new UsageError(`--${name}=${text} is invalid; use a whole number from ${min} to ${max}`);
  }
  return Number(text);
}

/**
 * Parses a finite number option.
 * @param {string} name option name, for messages
 * @param {string} text option value
 * @returns {number} the value
 */
function parseFinite(name, text) {
  const value = Number(text);
  if (text.trim() === "" || !Number.isFinite(value)) {
    throw new UsageError(`--${name}=${text} is invalid; use a finite number`);
  }
  return value;
}

/**
 * Parses the seed as an unsigned 64-bit value, kept as a decimal string for the uint64 field.
 * protobufjs encodes a non-numeric string as 0, so the client checks the text itself.
 * @param {string} text option value
 * @returns {string} the seed in decimal
 */
function parseSeed(text) {
  if (!/^\d+$/.test(text) || BigInt(text) > MAX_UINT64) {
    throw new UsageError(`--seed=${text} is invalid; use a whole number from 0 to ${MAX_UINT64}`);
  }
  return BigInt(text).toString();
}

/**
 * Parses the command line.
 * @param {string[]} argv arguments after the script name
 * @returns {object} the options, with numbers parsed and unset options undefined
 */
function parseOptions(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        address: { type: "string", default: "127.0.0.1:50051" },
        count: { type: "string", default: "20" },
        seed: { type: "string" },
        temperature: { type: "string" },
        margin: { type: "string" },
        unit: { type: "string" },
        "chunk-beats": { type: "string" },
        "timeout-s": { type: "string", default: "300" },
        "bad-count": { type: "boolean", default: false },
        help: { type: "boolean", default: false },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (error) {
    throw new UsageError(error.message);
  }
  if (values.unit !== undefined && !(values.unit in UNITS)) {
    throw new UsageError(`--unit=${values.unit} is invalid; use millivolt or normalised`);
  }
  const timeoutS = parseFinite("timeout-s", values["timeout-s"]);
  if (timeoutS <= 0) {
    throw new UsageError(`--timeout-s=${values["timeout-s"]} is invalid; use a value above 0`);
  }
  return {
    address: values.address,
    count: parseWholeNumber("count", values.count, 1, MAX_UINT32),
    seed: values.seed === undefined ? undefined : parseSeed(values.seed),
    temperature:
      values.temperature === undefined ? undefined : parseFinite("temperature", values.temperature),
    margin: values.margin === undefined ? undefined : parseFinite("margin", values.margin),
    unit: values.unit === undefined ? undefined : UNITS[values.unit],
    chunkBeats:
      values["chunk-beats"] === undefined
        ? undefined
        : parseWholeNumber("chunk-beats", values["chunk-beats"], 1, MAX_UINT32),
    timeoutS,
    badCount: values["bad-count"],
    help: values.help,
  };
}

/**
 * Loads the service from the .proto file. Enums are read and written as their names
 * (BEAT_CLASS_N), uint64 fields are read as decimal strings, and bytes as Buffers.
 * @param {string} address server HOST:PORT
 * @returns {object} a client of appliance.v1.ApplianceService on an insecure channel
 */
function createClient(address) {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    enums: String,
    longs: String,
    defaults: true,
    oneofs: true,
  });
  const { ApplianceService } = grpc.loadPackageDefinition(definition).appliance.v1;
  return new ApplianceService(address, grpc.credentials.createInsecure());
}

/**
 * Returns the call options with a deadline of timeoutS seconds from now.
 * @param {number} timeoutS deadline in seconds
 * @returns {object} call options
 */
function callOptions(timeoutS) {
  return { deadline: new Date(Date.now() + timeoutS * 1000) };
}

/**
 * Calls a unary method and resolves with its reply.
 * @param {object} client service client
 * @param {string} method method name
 * @param {object} request request message as a plain object
 * @param {number} timeoutS deadline in seconds
 * @returns {Promise<object>} the reply
 */
function callUnary(client, method, request, timeoutS) {
  return new Promise((resolve, reject) => {
    client[method](request, callOptions(timeoutS), (error, reply) => {
      if (error) {
        reject(error);
      } else {
        resolve(reply);
      }
    });
  });
}

/**
 * Decodes Samples into nested arrays [beat][lead][sample] of the float32 values.
 * @param {object} samples appliance.v1.Samples with values_f32 as a Buffer
 * @param {object} info GetModelInfo reply, whose leads and window_samples the shape must match
 * @returns {number[][][]} the beats
 */
function decodeSamples(samples, info) {
  const { count, leads, window_samples: windowSamples, values_f32: bytes } = samples;
  if (leads !== info.leads.length || windowSamples !== info.window_samples) {
    throw new Error(
      `Generate returned samples of ${leads} leads x ${windowSamples} samples, but the model ` +
        `has ${info.leads.length} leads x ${info.window_samples} samples`,
    );
  }
  const expectedBytes = count * leads * windowSamples * FLOAT32_BYTES;
  if (bytes.length !== expectedBytes) {
    throw new Error(
      `Generate returned ${bytes.length} bytes of samples, but count=${count}, ` +
        `leads=${leads} and window_samples=${windowSamples} need ${expectedBytes}`,
    );
  }
  // A DataView reads little-endian explicitly, whatever the host's byte order, and it does
  // not need the Buffer's offset to be a multiple of 4.
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const beats = [];
  let offset = 0;
  for (let beat = 0; beat < count; beat += 1) {
    const beatLeads = [];
    for (let lead = 0; lead < leads; lead += 1) {
      const values = new Array(windowSamples);
      for (let sample = 0; sample < windowSamples; sample += 1) {
        values[sample] = view.getFloat32(offset, true);
        offset += FLOAT32_BYTES;
      }
      beatLeads.push(values);
    }
    beats.push(beatLeads);
  }
  return beats;
}

/**
 * Encodes beats [beat][lead][sample] as packed little-endian float32 bytes in C order.
 * @param {number[][][]} beats the beats
 * @returns {Buffer} the bytes
 */
function encodeValues(beats) {
  const values = beats.flat(2);
  const bytes = Buffer.alloc(values.length * FLOAT32_BYTES);
  values.forEach((value, index) => bytes.writeFloatLE(value, index * FLOAT32_BYTES));
  return bytes;
}

/**
 * Streams Generate and collects the beats, classes, scores and stats of every chunk.
 * @param {object} client service client
 * @param {object} request GenerateRequest as a plain object
 * @param {object} info GetModelInfo reply
 * @param {number} timeoutS deadline in seconds
 * @returns {Promise<object>} beats, classes, scores, unit, fs_hz and stats
 */
async function generate(client, request, info, timeoutS) {
  const result = { beats: [], classes: [], scores: [], unit: null, fs_hz: null, stats: null };
  const call = client.Generate(request, callOptions(timeoutS));
  for await (const chunk of call) {
    if (chunk.samples !== null && chunk.samples.count > 0) {
      const beats = decodeSamples(chunk.samples, info);
      if (chunk.beat_classes.length !== beats.length || chunk.scores.length !== beats.length) {
        throw new Error(
          `Generate returned ${beats.length} beats with ${chunk.beat_classes.length} classes ` +
            `and ${chunk.scores.length} scores in one response; expected one of each per beat`,
        );
      }
      result.beats.push(...beats);
      result.classes.push(...chunk.beat_classes);
      result.scores.push(...chunk.scores);
      result.unit = chunk.samples.unit;
      result.fs_hz = chunk.fs_hz;
    }
    if (chunk.stats !== null) {
      result.stats = {
        draws: Number(chunk.stats.draws),
        accepted: Number(chunk.stats.accepted),
        pertinence_rejections: Number(chunk.stats.pertinence_rejections),
        privacy_rejections: Number(chunk.stats.privacy_rejections),
        invalid_rejections: Number(chunk.stats.invalid_rejections),
        surplus_dropped: Number(chunk.stats.surplus_dropped),
        privacy_threshold: chunk.stats.privacy_threshold,
        margin: chunk.stats.margin,
        budget_exhausted: chunk.stats.budget_exhausted,
      };
    }
  }
  return result;
}

/**
 * Returns the name of a gRPC status code, for example INVALID_ARGUMENT for 3.
 * @param {number} code status code
 * @returns {string} the name, or UNKNOWN_CODE_<code>
 */
function statusName(code) {
  const entry = Object.entries(grpc.status).find(([, value]) => value === code);
  return entry === undefined ? `UNKNOWN_CODE_${code}` : entry[0];
}

/**
 * Sends Generate with count 0 and returns the status the call fails with.
 * @param {object} client service client
 * @param {number} timeoutS deadline in seconds
 * @returns {Promise<object>} code, code_name and details of the status
 */
async function sendBadCount(client, timeoutS) {
  const call = client.Generate({ count: 0 }, callOptions(timeoutS));
  try {
    for await (const chunk of call) {
      void chunk;
    }
  } catch (error) {
    if (typeof error.code !== "number") {
      throw error;
    }
    return { code: error.code, code_name: statusName(error.code), details: error.details };
  }
  throw new Error("Generate with count=0 succeeded; the server should reject it");
}

/**
 * Serializes a value as JSON like JSON.stringify, but writes negative zero as -0.0 so that a
 * float32 reader gets its sign bit back (JSON.stringify writes 0).
 * @param {*} value plain data: objects, arrays, strings, numbers, booleans and null
 * @returns {string} the JSON text
 */
function toJson(value) {
  if (Object.is(value, -0)) {
    return "-0.0";
  }
  if (Array.isArray(value)) {
    return `[${value.map(toJson).join(",")}]`;
  }
  if (value !== null && typeof value === "object") {
    const fields = Object.entries(value)
      .filter(([, field]) => field !== undefined)
      .map(([key, field]) => `${JSON.stringify(key)}:${toJson(field)}`);
    return `{${fields.join(",")}}`;
  }
  return JSON.stringify(value);
}

/**
 * Returns the server's message limit in bytes; servers that do not report one use 4 MiB.
 * @param {object} info GetModelInfo reply
 * @returns {number} bytes
 */
function validateMessageBytes(info) {
  const reported = Number(info.max_message_bytes ?? 0);
  return reported > 0 ? reported : DEFAULT_MAX_MESSAGE_BYTES;
}

/**
 * Returns the most beats that one Validate call may carry on this server.
 * @param {object} info GetModelInfo reply
 * @returns {number} beats
 */
function validateCallFit(info) {
  const messageBytes = validateMessageBytes(info);
  const sampleBytes = info.leads.length * info.window_samples * FLOAT32_BYTES;
  const beatBytes = sampleBytes + REQUEST_BYTES_PER_BEAT;
  const requestFit = Math.floor((messageBytes - REQUEST_FIXED_BYTES) / beatBytes);
  const replyFit = Math.floor((messageBytes - REPLY_FIXED_BYTES) / REPLY_BYTES_PER_BEAT);
  const perRequest = info.max_beats_per_request > 0 ? info.max_beats_per_request : Infinity;
  return Math.max(1, Math.min(perRequest, requestFit, replyFit));
}

/**
 * Runs GetModelInfo, Generate and Validate and returns the output object.
 * @param {object} client service client
 * @param {object} options parsed command-line options
 * @returns {Promise<object>} the output object
 */
async function generateAndValidate(client, options) {
  const info = await callUnary(client, "GetModelInfo", {}, options.timeoutS);
  const maxCount = validateCallFit(info);
  if (options.count > maxCount) {
    throw new UsageError(
      `--count=${options.count} is too large for this server: this client validates all ` +
        `beats in one call, which carries at most ${maxCount} beats here ` +
        `(max_beats_per_request ${info.max_beats_per_request}, max_message_bytes ` +
        `${validateMessageBytes(info)}); use --count ${maxCount} or less`,
    );
  }

  const generateRequest = {
    count: options.count,
    seed: options.seed,
    temperature: options.temperature,
    margin: options.margin,
    unit: options.unit,
    chunk_beats: options.chunkBeats,
  };
  const generated = await generate(client, generateRequest, info, options.timeoutS);
  if (generated.beats.length === 0) {
    throw new Error(
      `Generate accepted no beat of ${options.count} requested ` +
        `(stats: ${JSON.stringify(generated.stats)}); try a lower --margin`,
    );
  }

  const validateRequest = {
    samples: {
      count: generated.beats.length,
      leads: info.leads.length,
      window_samples: info.window_samples,
      values_f32: encodeValues(generated.beats),
      unit: generated.unit,
    },
    beat_classes: generated.classes,
    margin: options.margin,
    fs_hz: info.fs_hz,
  };
  const validated = await callUnary(client, "Validate", validateRequest, options.timeoutS);

  return {
    model_info: {
      model_id: info.model_id,
      fs_hz: info.fs_hz,
      leads: info.leads,
      window_samples: info.window_samples,
      classes_known: info.classes_known,
      default_margin: info.default_margin,
      max_beats_per_request: info.max_beats_per_request,
    },
    request: generateRequest,
    generate: {
      beats: generated.beats,
      shape: [generated.beats.length, info.leads.length, info.window_samples],
      unit: generated.unit,
      fs_hz: generated.fs_hz,
      classes: generated.classes,
      scores: generated.scores,
      stats: generated.stats,
    },
    validate: {
      scores: validated.scores,
      accepted: validated.accepted,
      classes: validated.beat_classes,
      margin: validated.margin,
    },
  };
}

/**
 * Runs the client and returns the process exit code.
 * @param {string[]} argv arguments after the script name
 * @returns {Promise<number>} 0 on success, 1 on a failed call or an unexpected status,
 *     2 on invalid options
 */
async function main(argv) {
  let client = null;
  try {
    const options = parseOptions(argv);
    if (options.help) {
      process.stdout.write(`${USAGE}\n`);
      return 0;
    }
    client = createClient(options.address);
    if (options.badCount) {
      const status = await sendBadCount(client, options.timeoutS);
      process.stdout.write(`${toJson(status)}\n`);
      if (status.code !== grpc.status.INVALID_ARGUMENT) {
        process.stderr.write(
          `error: Generate with count=0 failed with ${status.code_name}; ` +
            `the server should reject it with INVALID_ARGUMENT\n`,
        );
        return 1;
      }
      return 0;
    }
    const output = await generateAndValidate(client, options);
    process.stdout.write(`${toJson(output)}\n`);
    return 0;
  } catch (error) {
    if (error instanceof UsageError) {
      process.stderr.write(`error: ${error.message}\n${USAGE}\n`);
      return 2;
    }
    if (typeof error.code === "number") {
      process.stderr.write(
        `error: call failed with status ${statusName(error.code)} (${error.code}): ` +
          `${error.details}\n`,
      );
    } else {
      process.stderr.write(`error: ${error.message}\n`);
    }
    return 1;
  } finally {
    if (client !== null) {
      client.close();
    }
  }
}

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
