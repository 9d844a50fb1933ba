#include "keel/core/secrets.h"

#include <gtest/gtest.h>

#include <thread>

namespace keel {
namespace {

TEST(SecretsTest, ReplacesEveryOccurrence) {
  SecretRedactor r;
  r.Add("sk-live-123456");
  EXPECT_EQ(r.Redact("Bearer sk-live-123456 and again sk-live-123456."),
            "Bearer *** and again ***.");
  EXPECT_EQ(r.Redact("nothing here"), "nothing here");
}

TEST(SecretsTest, IgnoresVeryShortSecrets) {
  SecretRedactor r;
  r.Add("abc");
  r.Add("");
  EXPECT_TRUE(r.empty());
  EXPECT_EQ(r.Redact("abc abc"), "abc abc");
}

TEST(SecretsTest, MasksTheLongerOfTwoOverlappingSecretsWhole) {
  SecretRedactor r;
  r.Add("secret");
  r.Add("secret-and-more");
  EXPECT_EQ(r.Redact("x secret-and-more y secret z"), "x *** y *** z");
}

TEST(SecretsTest, MasksTheJsonEscapedForm) {
  SecretRedactor r;
  r.Add("key/with\"quote");
  EXPECT_EQ(r.Redact(R"({"echo":"key\/with\"quote"})"), R"({"echo":"***"})");
}

TEST(SecretsTest, AddUrlPasswordsTakesTheUserinfoPasswordOnly) {
  SecretRedactor r;
  r.AddUrlPasswords("https://user:hunter2pw@api.example.com/v1");
  EXPECT_EQ(r.Redact("failed at https://user:hunter2pw@api.example.com/v1 (hunter2pw)"),
            "failed at https://user:***@api.example.com/v1 (***)");
  EXPECT_EQ(r.Redact("user api.example.com"), "user api.example.com");
}

TEST(SecretsTest, AddUrlPasswordsDecodesPercentEncodedPasswords) {
  SecretRedactor r;
  r.AddUrlPasswords("postgres://keel:p%40ss%3Aword@db/keel");
  EXPECT_EQ(r.Redact("p%40ss%3Aword"), "***");
  EXPECT_EQ(r.Redact("auth failed for p@ss:word"), "auth failed for ***");
}

TEST(SecretsTest, AddUrlPasswordsTakesAPasswordQueryParameter) {
  SecretRedactor r;
  r.AddUrlPasswords("postgres://db/keel?user=k&password=qwerty123&sslmode=require");
  EXPECT_EQ(r.Redact("qwerty123"), "***");
}

TEST(SecretsTest, AUrlWithoutAPasswordAddsNothing) {
  SecretRedactor r;
  r.AddUrlPasswords("https://api.example.com/v1");
  r.AddUrlPasswords("sqlite://keel-data/keel.db");
  r.AddUrlPasswords("redis://user@host:6379");
  EXPECT_TRUE(r.empty());
}

TEST(SecretsTest, ASecretWhoseMaskContainsItselfDoesNotLoop) {
  SecretRedactor r;
  r.Add("******");
  EXPECT_EQ(r.Redact("a ******** b"), "a ***** b");
}

TEST(SecretsTest, ClearForgetsEverySecret) {
  SecretRedactor r;
  r.Add("sk-abcdef");
  r.Clear();
  EXPECT_EQ(r.Redact("sk-abcdef"), "sk-abcdef");
}

TEST(SecretsTest, IsSafeToUseFromSeveralThreads) {
  SecretRedactor r;
  std::thread writer([&] {
    for (int i = 0; i < 200; ++i) r.Add("secret-number-" + std::to_string(i));
  });
  for (int i = 0; i < 200; ++i) (void)r.Redact("secret-number-1 and secret-number-150");
  writer.join();
  EXPECT_EQ(r.Redact("secret-number-199"), "***");
}

TEST(SecretsTest, TheProcessWideRedactorIsShared) {
  Secrets().Add("process-wide-secret");
  EXPECT_EQ(RedactSecrets("x process-wide-secret"), "x ***");
  Secrets().Clear();
}

}  // namespace
}  // namespace keel
