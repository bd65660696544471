// The `ai` package's own parser reads one generation served with ?format=ai-sdk:
//
// - "replay": from the start, through DefaultChatTransport.reconnectToStream, the very
//   request useChat({ resume: true }) makes;
// - "resumed": for each cut point k, a reader that loses its connection after k SSE
//   messages and resumes with Last-Event-ID, both connections spliced into one chunk
//   stream, as a proxy that reconnects upstream does.
//
// Usage: node read_generation.mjs EVENTS_URL. Prints JSON: what each reader assembled.
import {
  DefaultChatTransport,
  parseJsonEventStream,
  readUIMessageStream,
  uiMessageChunkSchema,
} from 'ai';
import { EventSourceParserStream } from 'eventsource-parser/stream';

const url = process.argv[2];

// The message readUIMessageStream assembles, the finish (or abort) the stream ended with,
// and every error the parser reported: the server's `error` chunks and any chunk it refused.
async function assemble(chunks) {
  const result = { message: null, finishReason: null, abortReason: null, errors: [] };
  const observed = chunks.pipeThrough(
    new TransformStream({
      transform(chunk, controller) {
        if (chunk.type === 'finish') result.finishReason = chunk.finishReason ?? null;
        if (chunk.type === 'abort') result.abortReason = chunk.reason ?? null;
        controller.enqueue(chunk);
      },
    }),
  );
  const messages = readUIMessageStream({
    stream: observed,
    onError: error => result.errors.push(String(error?.message ?? error)),
  });
  for await (const message of messages) result.message = message;
  return result;
}

// What DefaultChatTransport does with a response body.
function uiMessageChunks(body) {
  return parseJsonEventStream({ stream: body, schema: uiMessageChunkSchema }).pipeThrough(
    new TransformStream({
      transform(parsed, controller) {
        if (!parsed.success) throw parsed.error;
        controller.enqueue(parsed.value);
      },
    }),
  );
}

// The SSE messages of one connection after `lastEventId`; null when the server said 204.
async function open(lastEventId, signal) {
  const headers = lastEventId === undefined ? {} : { 'Last-Event-ID': lastEventId };
  const response = await fetch(url, { headers, signal });
  if (response.status === 204) return null;
  if (response.status !== 200) throw new Error(`HTTP ${response.status}: ${await response.text()}`);
  return response.body.pipeThrough(new TextDecoderStream()).pipeThrough(new EventSourceParserStream());
}

// A message without `id:` belongs with the next one that has it: held until then, and
// dropped on a cut, since the resumed connection sends it again.
async function cutAndResumed(cut) {
  const released = [];
  let held = [];
  let lastEventId;
  let seen = 0;
  const take = message => {
    held.push(message.data);
    if (message.id !== undefined) {
      released.push(...held);
      held = [];
      lastEventId = message.id;
    }
  };
  const abort = new AbortController();
  const first = await open(undefined, abort.signal);
  for await (const message of first) {
    take(message);
    if (++seen === cut) break;
  }
  abort.abort();
  held = [];
  const resumedAfter = lastEventId ?? null;
  const second = await open(lastEventId);
  if (second !== null) {
    for await (const message of second) take(message);
  }
  released.push(...held);
  const body = new ReadableStream({
    start(controller) {
      const encoder = new TextEncoder();
      for (const data of released) controller.enqueue(encoder.encode(`data: ${data}\n\n`));
      controller.close();
    },
  });
  return { cut, resumedAfter, ...(await assemble(uiMessageChunks(body))) };
}

const transport = new DefaultChatTransport({
  prepareReconnectToStreamRequest: () => ({ api: url }),
});
const replayStream = await transport.reconnectToStream({ chatId: 'tokentape-test' });
const replay = await assemble(replayStream);

let total = 0;
for await (const _ of await open(undefined)) total++;
const resumed = [];
for (let cut = 1; cut < total; cut++) resumed.push(await cutAndResumed(cut));

process.stdout.write(JSON.stringify({ replay, messages: total, resumed }));
