// Requests that must fail. IMAGEGEN_CASES is a JSON list of
// {name, apiKey?, op: "generate" | "edit", params, image?, mask?}; for each case prints what
// the SDK threw (or that it did not).
import { describeError, env, makeClient, pngUpload, run } from "./common.mjs";

async function attempt(client, c) {
  if (c.op === "edit") {
    const request = { ...c.params, image: await pngUpload(c.image) };
    if (c.mask) {
      request.mask = await pngUpload(c.mask);
    }
    return client.images.edit(request);
  }
  const answer = await client.images.generate(c.params);
  if (c.params.stream) {
    for await (const _event of answer) {
      // A refusal comes before the first event; an error event throws here.
    }
  }
  return answer;
}

run(async () => {
  const results = {};
  for (const c of JSON.parse(env("IMAGEGEN_CASES"))) {
    const client = makeClient(c.apiKey ?? env("IMAGEGEN_API_KEY"));
    try {
      await attempt(client, c);
      results[c.name] = { threw: false };
    } catch (err) {
      results[c.name] = { threw: true, ...describeError(err) };
    }
  }
  return results;
});
