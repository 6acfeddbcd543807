// Shared by the scripts that tests/test_node_sdk.py runs: the client, built from the
// environment the test passes, and JSON on stdout (one document per run).
import fs from "node:fs";
import path from "node:path";

import OpenAI, { toFile } from "openai";

export function env(name) {
  const value = process.env[name];
  if (value === undefined) {
    throw new Error(`${name} is not set`);
  }
  return value;
}

// The request parameters, as a JSON object in IMAGEGEN_PARAMS.
export function params() {
  return JSON.parse(process.env.IMAGEGEN_PARAMS ?? "{}");
}

export function makeClient(apiKey = env("IMAGEGEN_API_KEY")) {
  return new OpenAI({
    baseURL: env("IMAGEGEN_BASE_URL"),
    apiKey,
    maxRetries: 0,
    timeout: Number(process.env.IMAGEGEN_TIMEOUT_MS ?? 15000),
  });
}

// A PNG file on disk as the SDK's upload.
export async function pngUpload(file) {
  return toFile(fs.readFileSync(file), path.basename(file), { type: "image/png" });
}

// What the SDK made of an error answer.
export function describeError(err) {
  return {
    class: err?.constructor?.name ?? null,
    isAPIError: err instanceof OpenAI.APIError,
    isAuthenticationError: err instanceof OpenAI.AuthenticationError,
    isBadRequestError: err instanceof OpenAI.BadRequestError,
    status: err?.status ?? null,
    code: err?.code ?? null,
    param: err?.param ?? null,
    type: err?.type ?? null,
    message: err?.message ?? String(err),
    error: err?.error ?? null,
    requestID: err?.requestID ?? null,
    shouldRetry: err?.headers?.get?.("x-should-retry") ?? null,
  };
}

export function print(value) {
  process.stdout.write(JSON.stringify(value) + "\n");
}

// Runs main(); an exception the script did not expect is printed and exits non-zero.
export function run(main) {
  main().then(print, (err) => {
    process.stderr.write(`${err?.stack ?? err}\n${JSON.stringify(describeError(err))}\n`);
    process.exitCode = 1;
  });
}
