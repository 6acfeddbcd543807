// client.images.edit: IMAGEGEN_IMAGE (and IMAGEGEN_MASK, if set) uploaded as PNG files, with
// IMAGEGEN_PARAMS; prints the answer.
import fs from "node:fs";

import { toFile } from "openai";

import { env, makeClient, params, run } from "./common.mjs";

run(async () => {
  const client = makeClient();
  const request = {
    ...params(),
    image: await toFile(fs.readFileSync(env("IMAGEGEN_IMAGE")), "in.png", { type: "image/png" }),
  };
  if (process.env.IMAGEGEN_MASK) {
    request.mask = await toFile(fs.readFileSync(process.env.IMAGEGEN_MASK), "mask.png", {
      type: "image/png",
    });
  }
  return { answer: await client.images.edit(request) };
});
